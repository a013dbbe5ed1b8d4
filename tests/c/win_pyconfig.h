/* Just enough configuration for CPython's headers to be read by MinGW-w64 as
 * a Windows x64 build of CPython would set them: it stands in for the
 * pyconfig.h of a Windows CPython (not available on this Linux machine) in
 * the compile-and-link check of the whole extension (make windows-extension).
 * Not for building a module anyone imports: wheels for Windows come from
 * MSVC through cibuildwheel. */
#ifndef SHMEMEXT_WIN_PYCONFIG_H
#define SHMEMEXT_WIN_PYCONFIG_H
#define MS_WIN64
#define MS_WIN32
#define MS_WINDOWS
#define NT_THREADS
#define WITH_THREAD
#define Py_ENABLE_SHARED 1
#define HAVE_DECLSPEC_DLL
#define SIZEOF_SHORT                    2
#define SIZEOF_INT                      4
#define SIZEOF_LONG                     4
#define SIZEOF_LONG_LONG                8
#define SIZEOF_VOID_P                   8
#define SIZEOF_SIZE_T                   8
#define SIZEOF_TIME_T                   8
#define SIZEOF_WCHAR_T                  2
#define SIZEOF_FLOAT                    4
#define SIZEOF_DOUBLE                   8
#define SIZEOF_FPOS_T                   8
#define SIZEOF_OFF_T                    4
#define SIZEOF__BOOL                    1
#define SIZEOF_PID_T                    4
#define SIZEOF_HKEY                     8
#define ALIGNOF_SIZE_T                  8
#define ALIGNOF_LONG                    4
#define PY_LONG_LONG                    long long
#define PY_LLONG_MIN                    LLONG_MIN
#define PY_LLONG_MAX                    LLONG_MAX
#define PY_ULLONG_MAX                   ULLONG_MAX
#define HAVE_WCHAR_H                    1
#define HAVE_STDARG_PROTOTYPES          1
#define HAVE_SYS_STAT_H                 1
#define HAVE_ERRNO_H                    1
#define PYLONG_BITS_IN_DIGIT            30
#define DOUBLE_IS_LITTLE_ENDIAN_IEEE754 1
#define Py_WINVER                       0x0A00
#define Py_NTDDI                        NTDDI_WIN10
#define PLATFORM                        "win32"
#endif
