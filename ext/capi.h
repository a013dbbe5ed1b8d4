/* Internal: what module.c and capi.c share about the C API. */
#ifndef SHMEMEXT_CAPI_INTERNAL_H
#define SHMEMEXT_CAPI_INTERNAL_H

#include <Python.h>

#include "../shmemext/include/shmemext.h"

/* In module.c: the Python side of the table. */
ShmemExt_Block *shmemext_default_block(void);
ShmemExt_Block *shmemext_block_from_object(PyObject *obj);

/* In capi.c: a new capsule holding the table. */
PyObject *shmemext_capi_capsule(void);

#endif
