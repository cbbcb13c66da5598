/*
 * Test-only LD_PRELOAD shim that lets the stock cxenstored 4.17 run on a
 * machine without a hypervisor, so the kvpfs conformance suite can compare
 * the embedded server with the real daemon.
 *
 * It stands in for the few libxenctrl / libxenevtchn / libxengnttab entry
 * points cxenstored uses, and fakes the two /proc/xen files dom0_init()
 * reads. Every domain is reported as existing and running; a mapped grant
 * is a fresh zeroed page, so an introduced guest gets a silent, empty ring.
 *
 * Build: gcc -shared -fPIC -O2 -Wall -o fakexen.so fakexen.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>

/* ---- libxenctrl -------------------------------------------------------- */

xc_interface *xc_interface_open(xentoollog_logger *logger,
                                xentoollog_logger *dombuild_logger,
                                unsigned open_flags)
{
    (void)logger;
    (void)dombuild_logger;
    (void)open_flags;
    return calloc(1, 64);
}

int xc_interface_close(xc_interface *xch)
{
    free(xch);
    return 0;
}

int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid,
                      unsigned int max_doms, xc_dominfo_t *info)
{
    (void)xch;
    if (max_doms < 1)
        return 0;
    memset(info, 0, sizeof(*info));
    info->domid = first_domid;
    info->running = 1;
    return 1;
}

/* ---- libxenevtchn ------------------------------------------------------ */

/* Read end of a pipe nobody writes to: the daemon polls it forever and never
 * sees an event-channel notification. */
static int silent_pipe[2] = { -1, -1 };
static int next_port = 10;

static xenevtchn_handle *fake_evtchn_handle(void)
{
    if (silent_pipe[0] < 0 && pipe2(silent_pipe, O_CLOEXEC) < 0)
        return NULL;
    return calloc(1, 64);
}

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger,
                                 unsigned int flags)
{
    (void)logger;
    (void)flags;
    return fake_evtchn_handle();
}

xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger,
                                   int fd, unsigned open_flags)
{
    (void)logger;
    (void)fd;
    (void)open_flags;
    return fake_evtchn_handle();
}

int xenevtchn_fd(xenevtchn_handle *xce)
{
    (void)xce;
    return silent_pipe[0];
}

xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce,
                                              unsigned int virq)
{
    (void)xce;
    (void)virq;
    return next_port++;
}

xenevtchn_port_or_error_t
xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                           evtchn_port_t remote_port)
{
    (void)xce;
    (void)domid;
    (void)remote_port;
    return next_port++;
}

int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
    (void)xce;
    (void)port;
    return 0;
}

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
    (void)xce;
    (void)port;
    return 0;
}

int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
    (void)xce;
    (void)port;
    return 0;
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    (void)xce;
    errno = EAGAIN;
    return -1;
}

/* ---- libxengnttab ------------------------------------------------------ */

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger,
                                 unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return calloc(1, 64);
}

int xengnttab_close(xengnttab_handle *xgt)
{
    free(xgt);
    return 0;
}

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
    (void)xgt;
    (void)nr_grants;
    return 0;
}

void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid,
                              uint32_t ref, int prot)
{
    void *page;

    (void)xgt;
    (void)domid;
    (void)ref;
    (void)prot;
    page = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return page == MAP_FAILED ? NULL : page;
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start_address,
                    uint32_t count)
{
    (void)xgt;
    return munmap(start_address, 4096UL * count);
}

/* ---- libc open() for the two /proc/xen files --------------------------- */

static int memfd_with(const char *name, const char *text, off_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC);

    if (fd < 0)
        return -1;
    if (text) {
        size_t len = strlen(text);
        if (write(fd, text, len) != (ssize_t)len) {
            close(fd);
            return -1;
        }
    }
    if (size > 0 && ftruncate(fd, size) < 0) {
        close(fd);
        return -1;
    }
    lseek(fd, 0, SEEK_SET);
    return fd;
}

int open(const char *path, int flags, ...)
{
    static int (*real_open)(const char *, int, ...);
    mode_t mode = 0;

    if (strcmp(path, "/proc/xen/xsd_port") == 0) {
        const char *port = getenv("FAKEXEN_XSD_PORT");
        return memfd_with("xsd_port", port && *port ? port : "1", 0);
    }
    if (strcmp(path, "/proc/xen/xsd_kva") == 0)
        return memfd_with("xsd_kva", NULL, 4096);

    if (!real_open)
        real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
        return real_open(path, flags, mode);
    }
    return real_open(path, flags);
}
