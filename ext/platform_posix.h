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
 * it; child_done once in the child, after the maps. */
void shx_posix_fork_prepare(shx_os_map *m);
void shx_posix_fork_parent(shx_os_map *m);
void shx_posix_fork_child(shx_os_map *m);
void shx_posix_fork_child_done(void);

/* Whether errno value e means "held by someone else" for a lock that was only tried. */
int shx_posix_busy(int e);

#endif
