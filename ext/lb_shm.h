/* lb_shm.h - the flow table's file: slots that outlive the process.
 *
 * The flow table's slots live in a file mapped MAP_SHARED (on tmpfs, e.g.
 * /run/lbcore/flows.shm), so that the next `lbcore run` on the same boot can
 * adopt the connections of the previous one, after a SIGTERM, a crash or a
 * SIGKILL alike. A file rather than a memfd handed over a Unix socket: a
 * handover needs the old process alive and cooperating at the moment it
 * matters least likely to be (a crash), and a file in /run is gone after a
 * reboot, when adopting would be wrong anyway (the clock restarts).
 *
 * Layout: one header page (struct lb_shm_hdr, zero padded to
 * LB_SHM_HDR_SIZE), then capacity slots of lb_flow_slot_size() bytes.
 * The header is written last when the file is made, and checked field by
 * field, with a checksum over all of it, before a single slot is read. */
#ifndef LB_SHM_H
#define LB_SHM_H
#include <stddef.h>
#include <stdint.h>

#define LB_SHM_MAGIC    "LBCFLOWS"
#define LB_SHM_HDR_SIZE 4096u
#define LB_SHM_BOOT_ID  16u          /* bytes of the kernel's boot id */

struct lb_shm_hdr {
    char     magic[8];               /* LB_SHM_MAGIC, no NUL */
    uint32_t version;                /* LB_FLOW_LAYOUT_VERSION of the writer */
    uint32_t hdr_size;               /* LB_SHM_HDR_SIZE */
    uint32_t slot_size;              /* lb_flow_slot_size() of the writer */
    uint32_t capacity;               /* slots after the header */
    uint64_t layout;                 /* lb_flow_layout_sig() of the writer */
    uint64_t seed;                   /* the writer's hash seed (not needed to
                                        adopt: adoption rehashes) */
    uint8_t  boot_id[LB_SHM_BOOT_ID];/* the boot it was made in */
    uint64_t created_ms;             /* CLOCK_REALTIME ms, for operators */
    uint32_t pid;                    /* the writer, for operators */
    uint32_t pad;
    uint64_t checksum;               /* FNV-1a 64 of the bytes above */
};

/* A mapping of a flow table file. */
struct lb_shm {
    void    *base;                   /* the whole file */
    size_t   len;
    void    *slots;                  /* base + LB_SHM_HDR_SIZE */
    uint32_t capacity;
    struct lb_shm_hdr hdr;           /* a checked copy of the header */
};

/* Why a file was not adopted (lb_shm_open_old's negative answers). */
enum lb_shm_refusal {
    LB_SHM_OK = 0,
    LB_SHM_ERR_OPEN = 1,             /* cannot open / stat / map: errno in *err */
    LB_SHM_ERR_NOT_FILE,             /* not a regular file */
    LB_SHM_ERR_SHORT,                /* shorter than a header */
    LB_SHM_ERR_MAGIC,                /* not a flow table file */
    LB_SHM_ERR_CHECKSUM,             /* header checksum mismatch (garbage, torn) */
    LB_SHM_ERR_VERSION,              /* another layout version */
    LB_SHM_ERR_LAYOUT,               /* same version, other slot layout */
    LB_SHM_ERR_CAPACITY,             /* capacity out of range */
    LB_SHM_ERR_TRUNCATED,            /* file shorter than its capacity says */
    LB_SHM_ERR_BOOT,                 /* made in another boot */
    LB_SHM_ERR__COUNT
};

/* The checksum stored in (and expected of) a header. */
uint64_t lb_shm_checksum(const struct lb_shm_hdr *h);

/* Make path (O_EXCL: the caller removes a stale one first), size it for
 * capacity slots, map it shared and write its header. 0, or -errno (the
 * file is removed again). */
int lb_shm_create(const char *path, uint32_t capacity, uint64_t seed,
                  const uint8_t *boot_id, struct lb_shm *out);

/* Open path read-only and check it can be adopted by this build in boot
 * boot_id: LB_SHM_OK with *out mapped (private, read-only), or a refusal
 * (*err: errno for LB_SHM_ERR_OPEN). Never reads a slot. */
int lb_shm_open_old(const char *path, const uint8_t *boot_id, struct lb_shm *out, int *err);

void lb_shm_close(struct lb_shm *m);
#endif
