/* lb_vnet.h - the one check of the virtio_net_hdr in front of a packet
 * (TUN with IFF_VNET_HDR, AF_PACKET with PACKET_VNET_HDR).
 *
 * The header is passed on unchanged: NAT keeps every length and offset, so
 * GSO fields (gso_type/size, hdr_len) and csum_start/offset stay valid for
 * the rewritten super-packet. Only NEEDS_CSUM matters to the pipeline: the
 * L4 checksum then holds the pseudo-header sum only (CHECKSUM_PARTIAL), and
 * csum_start must point inside the frame, past its L2 header. */
#ifndef LB_VNET_H
#define LB_VNET_H
#include <stdint.h>
#include <linux/virtio_net.h>

/* vh: the header of a frame of frame_len bytes (after the header) whose IP
 * header starts at l2_len (0 on a TUN, 14 for Ethernet). 0 with *csum_start
 * the checksum start relative to the IP header (0: not NEEDS_CSUM), or -1
 * when the header is inconsistent with the frame (a bad_vnet drop). */
static inline int lb_vnet_csum_start(const struct virtio_net_hdr *vh, uint32_t l2_len,
                                     uint32_t frame_len, uint16_t *csum_start)
{
    *csum_start = 0;
    if (vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (vh->csum_start <= l2_len
            || (uint32_t)vh->csum_start + vh->csum_offset + 2 > frame_len)
            return -1;
        *csum_start = (uint16_t)(vh->csum_start - l2_len);
    }
    return 0;
}
#endif
