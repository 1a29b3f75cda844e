#ifndef C_PAGED_MEMORY_H
#define C_PAGED_MEMORY_H
#ifdef __linux__
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>

/* Linux values (x86_64 and aarch64 differ for O_DIRECT) where the headers hide them. */
#ifndef O_DIRECT
#if defined(__aarch64__)
#define O_DIRECT 0200000
#else
#define O_DIRECT 040000
#endif
#endif
#ifndef O_TMPFILE
#define O_TMPFILE (020000000 | O_DIRECTORY)
#endif

/* Open flags Swift's Glibc module does not import (they need _GNU_SOURCE). */
static const int cpaged_O_DIRECT = O_DIRECT;
static const int cpaged_O_TMPFILE = O_TMPFILE;

#endif
#endif
