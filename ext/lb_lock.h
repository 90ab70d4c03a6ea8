/* lb_lock.h - the small spinlock of the shared side tables (fragment cache,
 * per-client table): test-and-test-and-set, yielding the CPU after a bounded
 * spin so that a preempted holder does not stall the others on an
 * oversubscribed machine. Critical sections are a few dozen instructions
 * plus, for the fragment cache, one copy of a held fragment. */
#ifndef LB_LOCK_H
#define LB_LOCK_H
#include <sched.h>
#include <stdint.h>

static inline void lb_spin_lock(uint32_t *l)
{
    for (;;) {
        if (!__atomic_exchange_n(l, 1u, __ATOMIC_ACQUIRE))
            return;
        uint32_t spins = 0;
        while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            if (++spins >= 128u) {
                sched_yield();
                spins = 0;
            }
        }
    }
}

static inline void lb_spin_unlock(uint32_t *l)
{
    __atomic_store_n(l, 0u, __ATOMIC_RELEASE);
}

#define LB_CNT_INC(p) __atomic_fetch_add((p), 1u, __ATOMIC_RELAXED)
#endif
