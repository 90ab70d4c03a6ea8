/* lb_shm.c - the flow table's file, see lb_shm.h. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lb_consts.h"
#include "lb_flow.h"
#include "lb_shm.h"

_Static_assert(sizeof(struct lb_shm_hdr) <= LB_SHM_HDR_SIZE, "header fits its page");

uint64_t lb_shm_checksum(const struct lb_shm_hdr *h)
{
    const uint8_t *p = (const uint8_t *)h;
    uint64_t x = 0xCBF29CE484222325ull;

    for (size_t i = 0; i < offsetof(struct lb_shm_hdr, checksum); i++) {
        x ^= p[i];
        x *= 0x100000001B3ull;
    }
    return x;
}

static size_t shm_len(uint32_t capacity)
{
    return LB_SHM_HDR_SIZE + (size_t)capacity * lb_flow_slot_size();
}

int lb_shm_create(const char *path, uint32_t capacity, uint64_t seed,
                  const uint8_t *boot_id, struct lb_shm *out)
{
    struct lb_shm_hdr h;
    struct timespec ts;
    size_t len;
    void *base;
    int fd, rc;

    memset(out, 0, sizeof(*out));
    if (capacity < 1 || capacity > LB_FLOW_MAX)
        return -EINVAL;
    len = shm_len(capacity);
    /* root-only: the file holds every client's address and the hash seed */
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return -errno;
    /* a sparse file: tmpfs commits pages only as flows arrive */
    if (ftruncate(fd, (off_t)len) < 0) {
        rc = -errno;
        goto fail;
    }
    base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = -errno;
        goto fail;
    }
    close(fd);
#ifdef MADV_HUGEPAGE
    madvise(base, len, MADV_HUGEPAGE);   /* a hint: tmpfs may not do it */
#endif
    memset(&h, 0, sizeof(h));
    memcpy(h.magic, LB_SHM_MAGIC, sizeof(h.magic));
    h.version = LB_FLOW_LAYOUT_VERSION;
    h.hdr_size = LB_SHM_HDR_SIZE;
    h.slot_size = lb_flow_slot_size();
    h.capacity = capacity;
    h.layout = lb_flow_layout_sig();
    h.seed = seed;
    memcpy(h.boot_id, boot_id, LB_SHM_BOOT_ID);
    clock_gettime(CLOCK_REALTIME, &ts);
    h.created_ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    h.pid = (uint32_t)getpid();
    h.checksum = lb_shm_checksum(&h);
    memcpy(base, &h, sizeof(h));
    out->base = base;
    out->len = len;
    out->slots = (uint8_t *)base + LB_SHM_HDR_SIZE;
    out->capacity = capacity;
    out->hdr = h;
    return 0;
fail:
    close(fd);
    unlink(path);
    return rc;
}

int lb_shm_open_old(const char *path, const uint8_t *boot_id, struct lb_shm *out, int *err)
{
    struct lb_shm_hdr h;
    struct stat st;
    int fd, rc = LB_SHM_OK;
    void *base;

    memset(out, 0, sizeof(*out));
    *err = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        *err = errno;
        return LB_SHM_ERR_OPEN;
    }
    if (fstat(fd, &st) < 0) {
        *err = errno;
        rc = LB_SHM_ERR_OPEN;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = LB_SHM_ERR_NOT_FILE;
        goto out;
    }
    if ((uint64_t)st.st_size < LB_SHM_HDR_SIZE ||
        pread(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h)) {
        rc = LB_SHM_ERR_SHORT;
        goto out;
    }
    if (memcmp(h.magic, LB_SHM_MAGIC, sizeof(h.magic)) != 0) {
        rc = LB_SHM_ERR_MAGIC;
        goto out;
    }
    if (h.checksum != lb_shm_checksum(&h)) {
        rc = LB_SHM_ERR_CHECKSUM;
        goto out;
    }
    if (h.version != LB_FLOW_LAYOUT_VERSION) {
        rc = LB_SHM_ERR_VERSION;
        goto out;
    }
    if (h.hdr_size != LB_SHM_HDR_SIZE || h.slot_size != lb_flow_slot_size() ||
        h.layout != lb_flow_layout_sig()) {
        rc = LB_SHM_ERR_LAYOUT;
        goto out;
    }
    if (h.capacity < 1 || h.capacity > LB_FLOW_MAX) {
        rc = LB_SHM_ERR_CAPACITY;
        goto out;
    }
    if ((uint64_t)st.st_size < (uint64_t)shm_len(h.capacity)) {
        rc = LB_SHM_ERR_TRUNCATED;
        goto out;
    }
    if (memcmp(h.boot_id, boot_id, LB_SHM_BOOT_ID) != 0) {
        rc = LB_SHM_ERR_BOOT;
        goto out;
    }
    /* private and read-only: adoption never writes the old file, so a crash
     * during adoption leaves it intact for the next try */
    base = mmap(NULL, shm_len(h.capacity), PROT_READ, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) {
        *err = errno;
        rc = LB_SHM_ERR_OPEN;
        goto out;
    }
    out->base = base;
    out->len = shm_len(h.capacity);
    out->slots = (uint8_t *)base + LB_SHM_HDR_SIZE;
    out->capacity = h.capacity;
    out->hdr = h;
out:
    close(fd);
    return rc;
}

void lb_shm_close(struct lb_shm *m)
{
    if (m->base)
        munmap(m->base, m->len);
    memset(m, 0, sizeof(*m));
}
