/*
 * LD_PRELOAD shim that lets Debian's user-mode Linux 6.1 run on hosts whose XSAVE area
 * is larger than UML's fixed `struct _xstate` (AVX-512 and AMX machines).
 *
 * UML saves and restores a guest thread's floating-point registers with
 * PTRACE_GETREGSET / PTRACE_SETREGSET (NT_X86_XSTATE) and a buffer of
 * sizeof(struct _xstate) = 832 bytes. The host kernel truncates a GETREGSET happily but
 * refuses a SETREGSET whose size is not the full user XSAVE size with EFAULT, so the
 * first return to guest user space fails ("userspace - ptrace set fp regs failed,
 * errno = 14") and the guest's init dies before it runs.
 *
 * This shim wraps ptrace() for exactly those two requests: it keeps, per UML buffer
 * address (one per guest task), the full XSAVE image last read, hands UML the prefix it
 * asked for, and on SETREGSET writes the full image back with UML's (possibly modified)
 * prefix on top. Every other request goes straight to libc. The upper AVX-512 state of
 * each guest task therefore survives context switches as it would on a native kernel.
 *
 * UML calls ptrace from one host thread only, so the table needs no lock.
 * Built by integration/build.rs; used by integration/src/uml.rs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static ptrace_fn real_ptrace;
/* The host's full user XSAVE size, learnt on the first XSTATE request. */
static size_t full_size;

#define SLOTS 16384
struct slot {
	void *key;
	unsigned char *image;
	int filled;
};
static struct slot slots[SLOTS];
/* Used when the table is full: extended state is then not kept per task. */
static struct slot spare;

static struct slot *slot_for(void *key)
{
	size_t start = ((uintptr_t)key >> 4) % SLOTS;
	for (size_t i = 0; i < SLOTS; i++) {
		struct slot *s = &slots[(start + i) % SLOTS];
		if (s->key == key)
			return s;
		if (s->key == NULL) {
			s->image = calloc(1, full_size);
			if (s->image == NULL)
				break;
			s->key = key;
			return s;
		}
	}
	if (spare.image == NULL)
		spare.image = calloc(1, full_size);
	spare.filled = 0;
	return spare.image ? &spare : NULL;
}

long ptrace(enum __ptrace_request request, ...)
{
	va_list ap;
	va_start(ap, request);
	pid_t pid = va_arg(ap, pid_t);
	void *addr = va_arg(ap, void *);
	void *data = va_arg(ap, void *);
	va_end(ap);

	if (real_ptrace == NULL)
		real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	if ((request != PTRACE_GETREGSET && request != PTRACE_SETREGSET) ||
	    (uintptr_t)addr != NT_X86_XSTATE)
		return real_ptrace(request, pid, addr, data);

	struct iovec *caller = data;
	if (full_size == 0) {
		static unsigned char probe[1 << 16];
		struct iovec iov = { probe, sizeof probe };
		long r = real_ptrace(PTRACE_GETREGSET, pid, addr, &iov);
		if (r < 0)
			return r;
		full_size = iov.iov_len;
	}
	if (caller->iov_len >= full_size)
		return real_ptrace(request, pid, addr, data);

	struct slot *s = slot_for(caller->iov_base);
	if (s == NULL) {
		errno = ENOMEM;
		return -1;
	}
	struct iovec full = { s->image, full_size };
	if (request == PTRACE_GETREGSET) {
		long r = real_ptrace(request, pid, addr, &full);
		if (r < 0)
			return r;
		size_t n = full.iov_len < caller->iov_len ? full.iov_len : caller->iov_len;
		memcpy(caller->iov_base, s->image, n);
		caller->iov_len = n;
		s->filled = 1;
		return r;
	}
	if (!s->filled) {
		/* Never read through this buffer: keep the tracee's current extended state. */
		long r = real_ptrace(PTRACE_GETREGSET, pid, addr, &full);
		if (r < 0)
			return r;
		full.iov_len = full_size;
		s->filled = 1;
	}
	memcpy(s->image, caller->iov_base, caller->iov_len);
	return real_ptrace(request, pid, addr, &full);
}
