# persist.pxi - the flow table's file (ext/lb_shm.h) and the sync wire
# constants, as the control plane and the tests see them.
import uuid as _ps_uuid

FLOW_LAYOUT_VERSION = LB_FLOW_LAYOUT_VERSION
FLOW_FILE_HEADER_SIZE = LB_SHM_HDR_SIZE
SYNC_RECORD_SIZE = LB_SYNC_REC_SIZE
SYNC_NEW, SYNC_REFRESH, SYNC_END = LB_SYNC_NEW, LB_SYNC_REFRESH, LB_SYNC_END

# Why a flow table file was not adopted: code -> (name, message).
_REFUSALS = {
    LB_SHM_ERR_OPEN: ("open", "cannot open it"),
    LB_SHM_ERR_NOT_FILE: ("not_file", "not a regular file"),
    LB_SHM_ERR_SHORT: ("short", "shorter than a header (truncated or empty)"),
    LB_SHM_ERR_MAGIC: ("magic", "not a flow table file (bad magic)"),
    LB_SHM_ERR_CHECKSUM: ("checksum", "its header checksum does not match (garbage or torn)"),
    LB_SHM_ERR_VERSION: ("version", "written by a build with another flow table layout "
                         "version"),
    LB_SHM_ERR_LAYOUT: ("layout", "written by a build with another slot layout"),
    LB_SHM_ERR_CAPACITY: ("capacity", "its capacity is out of range"),
    LB_SHM_ERR_TRUNCATED: ("truncated", "shorter than its capacity says (truncated)"),
    LB_SHM_ERR_BOOT: ("boot", "made before the last reboot (its timestamps are of another "
                      "clock)"),
}


def flow_slot_size() -> int:
    """Bytes per flow in the flow table's file (after its header page)."""
    return lb_flow_slot_size()


def flow_layout_signature() -> int:
    """This build's digest of the slot layout (the header's `layout`)."""
    return lb_flow_layout_sig()


def boot_id() -> bytes:
    """This boot's id (16 bytes), which a flow table file is stamped with."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return _ps_uuid.UUID(f.read().strip()).bytes


cdef bytes _boot_id_bytes(object value):
    if value is None:
        return boot_id()
    value = bytes(value)
    if len(value) != LB_SHM_BOOT_ID:
        raise ValueError(f"boot_id must be {LB_SHM_BOOT_ID} bytes, not {len(value)}")
    return value


cdef dict _refusal(int code, int err):
    name, msg = _REFUSALS.get(code, ("unknown", f"refused ({code})"))
    if code == LB_SHM_ERR_OPEN and err:
        msg = f"{msg}: {_ps_os_strerror(err)}"
    return {"adopted": 0, "refused": msg, "code": name}


def _ps_os_strerror(int err) -> str:
    import os
    return os.strerror(err)


def flow_file_header(path) -> dict:
    """The header of a flow table file as stored (for `lbcore`'s logs and
    for tests that forge one): raises OSError / ValueError if unreadable."""
    cdef lb_shm_hdr h
    with open(path, "rb") as f:
        raw = f.read(sizeof(lb_shm_hdr))
    if len(raw) < sizeof(lb_shm_hdr):
        raise ValueError(f"{path}: shorter than a header")
    memcpy(&h, <const char *>raw, sizeof(h))
    return {"magic": bytes(h.magic[:8]), "version": h.version, "hdr_size": h.hdr_size,
            "slot_size": h.slot_size, "capacity": h.capacity, "layout": h.layout,
            "seed": h.seed, "boot_id": bytes(h.boot_id[:16]), "created_ms": h.created_ms,
            "pid": h.pid, "checksum": h.checksum,
            "checksum_ok": h.checksum == lb_shm_checksum(&h)}


def flow_file_checksum(bytes header) -> int:
    """The checksum a header (its first bytes, as stored) must carry: lets a
    test forge a header of another version that is otherwise well-formed."""
    cdef lb_shm_hdr h
    if len(header) < sizeof(lb_shm_hdr):
        raise ValueError("shorter than a header")
    memcpy(&h, <const char *>header, sizeof(h))
    return lb_shm_checksum(&h)
