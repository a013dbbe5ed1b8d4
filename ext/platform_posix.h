/* What the POSIX backends share, inside the library: platform_posix.c holds
 * it; platform_sysv.c (Linux) and platform_lockfiles.c (macOS, the BSDs)
 * build on it.  Not part of the OS interface (platform.h).
 */
#ifndef SHMEMEXT_PLATFORM_POSIX_H
#define SHMEMEXT_PLATFORM_POSIX_H

#include "platform.h"

/* The process's attached maps, for fork() and exit.  Attach and detach hold
 * the registry lock throughout, and fork() takes it too (pthread_atfork), so
 * a fork never copies a descriptor that holds a gate.  enter fails only when
 * the fork handlers could not be installed. */
int shx_posix_registry_enter(shx_error *err);
void shx_posix_registry_leave(void);
void shx_posix_registry_add(shx_os_map *m);
void shx_posix_registry_remove(shx_os_map *m);

/* Each backend's part in fork(), called for every attached map while the
 * registry is locked: before it, in the parent after it, in the child after
 * it. */
void shx_posix_fork_prepare(shx_os_map *m);
void shx_posix_fork_parent(shx_os_map *m);
void shx_posix_fork_child(shx_os_map *m);

/* A writer lock the kernel keeps on m->writer_fd (released at death), plus
 * m->local_writer between this process's threads; the header's lock area
 * holds a marker and the holder's pid, which tells the next holder that a
 * writer died.  A thread that ends holding it hands it on as an owner death.
 * The backend supplies the descriptor lock: try (0, or -1 with errno) and
 * release. */
int shx_posix_writer_try(int fd);
void shx_posix_writer_release(int fd);
int shx_posix_file_lock_init(void *area, shx_error *err);
int shx_posix_file_lock(shx_os_map *m, void *area, int64_t timeout_ns, int *owner_died, shx_error *err);
int shx_posix_file_unlock(shx_os_map *m, void *area, shx_error *err);
/* The kernel-kept writer lock's part in fork() (writer_fork_fd opened by the
 * backend's prepare): the parent's and the child's. */
void shx_posix_writer_fork_parent(shx_os_map *m);
void shx_posix_writer_fork_child(shx_os_map *m);
/* In a fork() child: what the parent's threads held is not held here. */
void shx_posix_forget_all_held(void);

/* Takes a lock that another process may hold long: tries, then polls with
 * backoff, asking intr about every SHX_OS_POLL_NS.  0 when taken, -1 with
 * errno on an error, -2 when intr gave up.  try_lock: 0 or -1 with errno.
 * Called with the registry entered; it is left while waiting between tries. */
int shx_posix_poll_lock(int (*try_lock)(int fd), int fd, const shx_os_interrupt *intr);

/* What every POSIX attach does first: *created = 0, a security descriptor
 * (a Windows option) refused, and m->os_name made from name. */
int shx_posix_attach_start(shx_os_map *m, const char *name, unsigned flags, const char *security, int *created,
                           shx_error *err);

/* Whether errno value e means "held by someone else" for a lock that was only tried. */
int shx_posix_busy(int e);

#endif
