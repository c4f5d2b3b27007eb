// libtorch's CPU allocator with large blocks kept for reuse (see host_memory.rs for why).
//
// Blocks of 2 MiB or more are mapped by us, 2 MiB-aligned and advised as transparent huge pages;
// when freed they wait in an idle list (bounded in bytes) for the next allocation of the same
// page-rounded size. Smaller blocks go to c10's own alloc_cpu/free_cpu, as before.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr size_t kHuge = size_t(2) << 20;

// (mapped bytes, address) of blocks.
using Blocks = std::vector<std::pair<size_t, void *>>;

// Leaked on purpose: tensors may be freed while the process exits, after static destructors.
struct State {
    std::mutex mu;
    std::unordered_map<void *, size_t> live;  // our blocks in use -> mapped bytes
    Blocks idle;                              // freed blocks, oldest first
    size_t idle_bytes = 0;
    size_t idle_cap = 0;
    uint64_t maps = 0, reuses = 0;
};

State &state() {
    static State *s = new State();
    return *s;
}

size_t page_round(size_t n) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
}

// A fresh 2 MiB-aligned anonymous mapping of `bytes` (page-rounded), or nullptr.
void *map_block(size_t bytes) {
    const size_t len = bytes + kHuge;
    void *raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHuge - 1) / kHuge * kHuge;
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t end = aligned + bytes;
    if (start + len > end) munmap(reinterpret_cast<void *>(end), start + len - end);
    // Whole 2 MiB extents become huge pages where the kernel allows it (advice only).
    madvise(reinterpret_cast<void *>(aligned), bytes, MADV_HUGEPAGE);
    return reinterpret_cast<void *>(aligned);
}

// Takes idle blocks, oldest first, off the list until at most `keep` bytes stay idle; the caller
// holds mu and unmaps what this returns after letting go of it.
Blocks trim_locked(State &s, size_t keep) {
    size_t drop = 0;
    while (drop < s.idle.size() && s.idle_bytes > keep) {
        s.idle_bytes -= s.idle[drop].first;
        ++drop;
    }
    Blocks out(s.idle.begin(), s.idle.begin() + drop);
    s.idle.erase(s.idle.begin(), s.idle.begin() + drop);
    return out;
}

void unmap_all(const Blocks &blocks) {
    for (const auto &b : blocks) munmap(b.second, b.first);
}

// Sets the cap and unmaps what exceeds it.
void set_cap(size_t cap) {
    State &s = state();
    Blocks out;
    {
        std::lock_guard<std::mutex> g(s.mu);
        s.idle_cap = cap;
        out = trim_locked(s, cap);
    }
    unmap_all(out);
}

void *take(size_t n) {
    const size_t bytes = page_round(n);
    State &s = state();
    {
        std::lock_guard<std::mutex> g(s.mu);
        // Newest first: the block freed last is the likeliest still in cache.
        for (size_t i = s.idle.size(); i-- > 0;) {
            if (s.idle[i].first == bytes) {
                void *p = s.idle[i].second;
                s.idle.erase(s.idle.begin() + i);
                s.idle_bytes -= bytes;
                s.live.emplace(p, bytes);
                ++s.reuses;
                return p;
            }
        }
    }
    void *p = map_block(bytes);
    if (p == nullptr) {
        // Out of address space or memory: what waits idle goes back first, then one more try.
        Blocks out;
        {
            std::lock_guard<std::mutex> g(s.mu);
            out = trim_locked(s, 0);
        }
        unmap_all(out);
        p = map_block(bytes);
    }
    TORCH_CHECK(p != nullptr, "ringtrain host allocator: out of memory mapping ", bytes, " bytes");
    std::lock_guard<std::mutex> g(s.mu);
    s.live.emplace(p, bytes);
    ++s.maps;
    return p;
}

// The deleter of every block this allocator gives out: ours wait for reuse or are unmapped,
// small ones (c10's) go back to c10.
void release(void *p) {
    if (p == nullptr) return;
    State &s = state();
    Blocks out;
    {
        std::lock_guard<std::mutex> g(s.mu);
        auto it = s.live.find(p);
        if (it != s.live.end()) {
            const size_t bytes = it->second;
            s.live.erase(it);
            if (bytes > s.idle_cap) {
                out.emplace_back(bytes, p);
            } else {
                s.idle.emplace_back(bytes, p);
                s.idle_bytes += bytes;
                out = trim_locked(s, s.idle_cap);
            }
            p = nullptr;
        }
    }
    unmap_all(out);
    if (p != nullptr) c10::free_cpu(p);
}

struct HostAllocator final : c10::Allocator {
    c10::DataPtr allocate(size_t n) override {
        // One deleter for every block, as `raw_deleter` promises (ideep frees through it):
        // `release` sends a block it does not know back to c10.
        void *p = n >= kHuge ? take(n) : c10::alloc_cpu(n);
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
    }
    c10::DeleterFnPtr raw_deleter() const override { return &release; }
    void copy_data(void *dest, const void *src, std::size_t count) const override {
        default_copy_data(dest, src, count);
    }
};

}  // namespace

// Makes this allocator libtorch's CPU allocator (above the default's priority 0). Returns 0.
extern "C" int ringtrain_host_allocator_install(size_t idle_cap_bytes) {
    try {
        static HostAllocator *alloc = new HostAllocator();
        set_cap(idle_cap_bytes);
        c10::SetCPUAllocator(alloc, /*priority=*/1);
        return 0;
    } catch (...) {
        return 1;
    }
}

// Bytes that freed blocks may keep mapped for reuse (0: every freed block is unmapped at once).
extern "C" void ringtrain_host_allocator_set_idle_cap(size_t idle_cap_bytes) { set_cap(idle_cap_bytes); }

// Counters: blocks mapped, allocations served from the idle list, idle bytes now.
extern "C" void ringtrain_host_allocator_stats(uint64_t *maps, uint64_t *reuses, uint64_t *idle_bytes) {
    State &s = state();
    std::lock_guard<std::mutex> g(s.mu);
    *maps = s.maps;
    *reuses = s.reuses;
    *idle_bytes = s.idle_bytes;
}
