#include "weights.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "common.h"
#include "layers.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace sw {

namespace {

bool is_float(torch::ScalarType t) {
    return t == torch::kFloat32 || t == torch::kFloat16 || t == torch::kBFloat16 || t == torch::kFloat64;
}

std::string shape_str(c10::IntArrayRef s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); i++) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

// How many tensors load_weights converts at once, each on its own thread: two
// keep this 2-core machine's cores busy; more keep a many-core machine's
// memory bandwidth busy without holding every thread's temporaries at once.
constexpr int64_t kLoadThreads = 4;

bool ends_with(const std::string &s, const std::string &suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// ReuseCPUMemory's allocator (weights.h): blocks allocated while it is active
// are freed as usual whenever they are, after it too.
//
// c10::Allocator's interface changed in libtorch 2.x (seen in 2.11): allocate lost its const
// and copy_data became pure virtual. Both allocate signatures are defined,
// neither marked override: the one the headers declare overrides it, the other
// is an ordinary member; copy_data likewise overrides only where it exists.
class ReusingCPUAllocator final : public c10::Allocator {
public:
    c10::DataPtr allocate(size_t n) const { return allocate_block(n); }
    c10::DataPtr allocate(size_t n) { return allocate_block(n); }
    void copy_data(void *dest, const void *src, std::size_t count) const {
        if (count > 0) std::memcpy(dest, src, count);
    }
    c10::DataPtr allocate_block(size_t n) const {
        // Smaller blocks are glibc's to reuse: its heap hands back the most
        // recently freed (still cached) memory, without faults.
        if (n < min_block_.load(std::memory_order_relaxed)) {
            void *small = c10::alloc_cpu(n);
            return {small, small, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
        }
        void *p = nullptr;
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (!caps_.empty()) {
                auto it = kept_.lower_bound(n);
                if (it != kept_.end() && it->first - n <= n * slack_.load(std::memory_order_relaxed) / 8) {
                    p = it->second;
                    kept_bytes_ -= it->first;
                    kept_.erase(it);
                }
            }
        }
        if (p == nullptr) {
            p = c10::alloc_cpu(n);
            std::lock_guard<std::mutex> lock(mu_);
            sizes_[p] = n;
        }
        return {p, p, &ReusingCPUAllocator::release, c10::Device(c10::DeviceType::CPU)};
    }
    c10::DeleterFnPtr raw_deleter() const override { return &ReusingCPUAllocator::release; }

    static ReusingCPUAllocator &get() {
        static ReusingCPUAllocator a;
        return a;
    }
    // The first start makes this libtorch's CPU allocator; the last stop
    // frees the kept blocks and gives libtorch its own back. Users may
    // overlap (several models opening at once, a call during a load): each
    // names how many bytes it lets the allocator keep and the smallest block
    // worth keeping, and the largest cap and the smallest minimum of the
    // active users' hold.
    void start(size_t max_kept, size_t min_block, size_t slack) {
        std::lock_guard<std::mutex> lock(mu_);
        if (caps_.empty()) c10::SetCPUAllocator(this);
        caps_.insert(max_kept);
        mins_.insert(min_block);
        slacks_.insert(slack);
        min_block_.store(*mins_.begin(), std::memory_order_relaxed);
        slack_.store(*slacks_.begin(), std::memory_order_relaxed);
    }
    void stop(size_t max_kept, size_t min_block, size_t slack) {
        std::lock_guard<std::mutex> lock(mu_);
        caps_.erase(caps_.find(max_kept));
        mins_.erase(mins_.find(min_block));
        slacks_.erase(slacks_.find(slack));
        min_block_.store(mins_.empty() ? 0 : *mins_.begin(), std::memory_order_relaxed);
        slack_.store(slacks_.empty() ? 0 : *slacks_.begin(), std::memory_order_relaxed);
        if (caps_.empty()) c10::SetCPUAllocator(c10::GetDefaultCPUAllocator());
        trim();  // with no user left, every kept block
    }
    size_t kept_bytes() const {
        std::lock_guard<std::mutex> lock(mu_);
        return kept_bytes_;
    }

private:
    static void release(void *p) {
        auto &a = get();
        std::lock_guard<std::mutex> lock(a.mu_);
        auto it = a.sizes_.find(p);
        if (!a.caps_.empty() && it != a.sizes_.end()) {
            a.kept_.emplace(it->second, p);
            a.kept_bytes_ += it->second;
            a.trim();
            return;
        }
        if (it != a.sizes_.end()) a.sizes_.erase(it);
        c10::free_cpu(p);
    }
    // Frees kept blocks beyond the cap, the smallest first: the next request
    // is as likely to be as large as the last one. mu_ held.
    void trim() {
        const size_t cap = caps_.empty() ? 0 : *caps_.rbegin();
        while (kept_bytes_ > cap) {
            auto smallest = kept_.begin();
            kept_bytes_ -= smallest->first;
            sizes_.erase(smallest->second);
            c10::free_cpu(smallest->second);
            kept_.erase(smallest);
        }
    }
    mutable std::mutex mu_;
    std::multiset<size_t> caps_, mins_, slacks_;  // the active users' max_kept, min_block and slack
    std::atomic<size_t> min_block_{0}, slack_{0};
    mutable std::multimap<size_t, void *> kept_;        // freed while active, by size
    mutable size_t kept_bytes_ = 0;                     // their total
    mutable std::unordered_map<void *, size_t> sizes_;  // every live or kept block's size
};

// Same tensor up to trailing 1x1 kernel dimensions: Linear [o, i] vs Conv [o, i, 1, 1].
bool reshapeable(c10::IntArrayRef want, const std::vector<int64_t> &have) {
    auto strip = [](std::vector<int64_t> v) {
        while (v.size() > 2 && v.back() == 1) v.pop_back();
        return v;
    };
    return strip(want.vec()) == strip(have);
}

// One tensor of a module to fill: its source in the file and its dtype once
// loaded.
struct WeightJob {
    torch::Tensor target;
    Source src;
    const TensorEntry *entry;
    torch::ScalarType dtype;  // its dtype once loaded
    bool is_param;
    bool in_file = false;  // a lookup table left in the file mapping
};

// Every tensor of m matched against f before any is converted: a file that
// does not fit fails at once, naming the first tensor (in the module's order)
// that does not.
std::vector<WeightJob> plan_weights(torch::nn::Module &m, const SafeTensorsFile &f, const Resolver &resolve,
                                    torch::ScalarType dtype) {
    std::vector<WeightJob> jobs;
    auto check = [&](const std::string &name, const torch::Tensor &target, bool is_param) {
        Source src = resolve(name);
        const std::string &key = src.key;
        if (key.empty() || !f.has(key))
            fail(SW_ERR_NOT_FOUND, f.path() + ": missing tensor " + (key.empty() ? name : key));
        const TensorEntry &e = f.entry(key);
        const bool want_float = is_float(target.scalar_type());
        if (want_float && !is_float(e.scalar))
            fail(SW_ERR_FORMAT, f.path() + ": tensor " + key + " has dtype " + e.dtype + ", want F32, F16 or BF16");
        if (!want_float && is_float(e.scalar))
            fail(SW_ERR_FORMAT, f.path() + ": tensor " + key + " has dtype " + e.dtype + ", want an integer type");
        std::vector<int64_t> have = e.shape;
        if (src.parts > 1) {
            if (have.empty() || have[0] % src.parts != 0)
                fail(SW_ERR_FORMAT, f.path() + ": tensor " + key + " cannot be split in " + std::to_string(src.parts));
            have[0] /= src.parts;
        }
        if (target.sizes().vec() != have && !reshapeable(target.sizes(), have))
            fail(SW_ERR_FORMAT, f.path() + ": tensor " + key + " has shape " + shape_str(have) + ", the config needs " +
                                    shape_str(target.sizes()));
        jobs.push_back({target, std::move(src), &e, want_float ? dtype : target.scalar_type(), is_param});
    };
    for (auto &item : m.named_parameters(true)) check(item.key(), item.value(), true);
    for (auto &item : m.named_buffers(true)) check(item.key(), item.value(), false);
    return jobs;
}

}  // namespace

WeightStats check_weights(torch::nn::Module &m, const SafeTensorsFile &f, const Resolver &resolve,
                          torch::ScalarType dtype) {
    WeightStats stats;
    for (const auto &job : plan_weights(m, f, resolve, dtype)) {
        if (job.is_param) stats.params += job.target.numel();
        stats.bytes += job.target.numel() * static_cast<int64_t>(c10::elementSize(job.dtype));
    }
    return stats;
}

ReuseCPUMemory::ReuseCPUMemory(size_t max_kept, size_t min_block, size_t slack)
    : max_kept_(max_kept), min_block_(min_block), slack_(slack) {
    ReusingCPUAllocator::get().start(max_kept_, min_block_, slack_);
}

ReuseCPUMemory::~ReuseCPUMemory() { ReusingCPUAllocator::get().stop(max_kept_, min_block_, slack_); }

size_t ReuseCPUMemory::kept_bytes() { return ReusingCPUAllocator::get().kept_bytes(); }

WeightStats load_weights(torch::nn::Module &m, const SafeTensorsFile &f, const std::string &prefix,
                         torch::ScalarType dtype, const torch::Device &device) {
    return load_weights(m, f, prefixed(prefix), dtype, device);
}

Resolver prefixed(std::string prefix) {
    return [prefix = std::move(prefix)](const std::string &name) { return Source{prefix + name}; };
}

WeightStats load_weights(torch::nn::Module &m, const SafeTensorsFile &f, const Resolver &resolve,
                         torch::ScalarType dtype, const torch::Device &device) {
    torch::NoGradGuard no_grad;
    WeightStats stats;
    // Convolution kernels go from the mapping straight into oneDNN's layout
    // (layers.h: in one reorder, or through one kernel's temporary plain copy
    // at a time where libtorch prepacks them): the model never holds a kernel
    // in two layouts. Those that want channels-last kernels are copied out of
    // the mapping in that layout.
    std::unordered_map<const c10::TensorImpl *, Conv2dImpl *> packable;
    std::unordered_map<const c10::TensorImpl *, Conv2dImpl *> channels_last;
    if (prepack_convolutions(dtype, device))
        for (const auto &child : m.modules(/*include_self=*/true)) {
            auto *conv = dynamic_cast<Conv2dImpl *>(child.get());
            if (conv == nullptr || conv->prepacked()) continue;
            if (conv->cpu_kernel == Conv2dImpl::CPUKernel::ChannelsLast)
                channels_last[conv->weight.unsafeGetTensorImpl()] = conv;
            else
                packable[conv->weight.unsafeGetTensorImpl()] = conv;
        }
    // Linear weights likewise go straight into their blocked layout, in one
    // reorder from the file's dtype.
    std::unordered_map<const c10::TensorImpl *, LinearImpl *> blockable;
    if (block_linears(dtype, device))
        for (const auto &child : m.modules(/*include_self=*/true)) {
            auto *lin = dynamic_cast<LinearImpl *>(child.get());
            if (lin != nullptr && lin->blocked.empty() && lin->packed.isNone())
                blockable[lin->weight.unsafeGetTensorImpl()] = lin;
        }
    // Lookup tables stay in the file on the CPU, whatever the dtype: a call
    // reads a few of their rows (CLIP's 49408-token table is 38 M of the
    // text encoder's 123 M parameters, and a prompt reads 77 of its rows), so
    // converting them, or even reading them in, at load is wasted.
    std::unordered_map<const c10::TensorImpl *, EmbeddingImpl *> lookups;
    if (device.is_cpu())
        for (const auto &child : m.modules(/*include_self=*/true))
            if (auto *emb = dynamic_cast<EmbeddingImpl *>(child.get())) lookups[emb->weight.unsafeGetTensorImpl()] = emb;
    std::vector<WeightJob> jobs = plan_weights(m, f, resolve, dtype);

    std::optional<ReuseCPUMemory> reuse;
    if (!packable.empty())
        reuse.emplace(ReuseCPUMemory::kMaxKeptBytes, ReuseCPUMemory::kMinKeptBlock,
                      dtype == torch::kFloat32 ? ReuseCPUMemory::kLooseSlack : ReuseCPUMemory::kTightSlack);
    auto load = [&](WeightJob &job) {
        torch::Tensor &target = job.target;
        const std::string &key = job.src.key;
        const auto load_dtype = job.dtype;
        if (auto emb = lookups.find(target.unsafeGetTensorImpl());
            emb != lookups.end() && job.src.parts == 1 && is_float(job.entry->scalar) && is_float(load_dtype)) {
            if (auto t = f.map_stored(key); t.defined()) {
                target.set_data(t.reshape(target.sizes()));
                emb->second->rows_as = load_dtype;
                job.in_file = true;
                return;
            }
        }
        if (auto conv = packable.find(target.unsafeGetTensorImpl()); conv != packable.end() && job.src.parts == 1) {
            // target becomes a placeholder of its shape in load_dtype.
            f.load_with(key, [&](const torch::Tensor &view) {
                conv->second->prepack(view, load_dtype);
                return torch::Tensor();
            });
        } else if (auto lin = blockable.find(target.unsafeGetTensorImpl()); lin != blockable.end() && job.src.parts == 1) {
            f.load_with(key, [&](const torch::Tensor &view) {
                lin->second->block(view, load_dtype);
                return torch::Tensor();
            });
        } else if (auto conv = channels_last.find(target.unsafeGetTensorImpl());
                   conv != channels_last.end() && job.src.parts == 1) {
            f.load_with(key, [&](const torch::Tensor &view) {
                conv->second->hold_channels_last(view, load_dtype);
                return torch::Tensor();
            });
        } else {
            torch::Tensor t;
            if (job.src.parts > 1) {
                t = f.load(key).chunk(job.src.parts, 0)[static_cast<size_t>(job.src.part)].to(device, load_dtype, false,
                                                                                                true);
            } else {
                t = f.load(key, load_dtype, device);
            }
            target.set_data(t.reshape(target.sizes()).contiguous());
        }
    };
    // Each thread converts whole tensors, the largest first, one after
    // another: a conversion is one thread's, with no barrier at its end and no
    // thread waiting on another's page faults (bfloat16 SD 1.5 opened in
    // 1.25–1.34 against 1.40–1.54 s, each tensor split across both threads).
    // At most kLoadThreads tensors are in flight, each with its temporaries.
    // Float32 loads keep one: their kernels take freed blocks loosely
    // (kLooseSlack), and with two threads' frees interleaved that left up to
    // 0.13 GB more resident after an open, run to run, near float32's peak
    // mark (docs/benchmarks.md). So do loads onto a GPU: there the copy is
    // the device's, and not every backend's queue takes work from several
    // threads at once (MPS).
    std::stable_sort(jobs.begin(), jobs.end(), [](const WeightJob &a, const WeightJob &b) {
        return a.entry->end - a.entry->begin > b.entry->end - b.entry->begin;
    });
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    const int64_t threads =
        device.is_cpu() && dtype != torch::kFloat32 ? std::min<int64_t>(at::get_num_threads(), kLoadThreads) : 1;
    const at::ThreadLocalState caller;  // grad and inference mode are per thread
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {  // each thread drains the queue
        const at::ThreadLocalStateGuard as_caller(caller);
        try {
            for (size_t i; !failed.load() && (i = next++) < jobs.size();) load(jobs[i]);
        } catch (...) {
            failed = true;  // the others stop at their next tensor; parallel_for rethrows this
            throw;
        }
    });
    for (const auto &job : jobs) {
        if (job.is_param) stats.params += job.target.numel();
        if (!job.in_file) stats.bytes += job.target.numel() * static_cast<int64_t>(job.target.element_size());
    }
    return stats;
}

void randomize(torch::nn::Module &m, uint64_t seed) {
    torch::NoGradGuard no_grad;
    at::Generator gen = at::detail::createCPUGenerator(seed);
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    for (auto &item : m.named_parameters(true)) {
        auto &p = item.value();
        const auto &name = item.key();
        torch::Tensor v;
        if (p.dim() >= 2) {
            const double fan_in = static_cast<double>(p.numel() / p.size(0));
            v = torch::randn(p.sizes(), gen, opts) / std::sqrt(fan_in);
        } else if (ends_with(name, "weight")) {
            v = 1.0 + 0.1 * torch::randn(p.sizes(), gen, opts);
        } else {
            v = 0.02 * torch::randn(p.sizes(), gen, opts);
        }
        p.set_data(v);
    }
    for (auto &item : m.named_buffers(true)) {
        auto &b = item.value();
        const auto &name = item.key();
        if (ends_with(name, "running_mean")) {
            b.set_data(0.1 * torch::randn(b.sizes(), gen, opts));
        } else if (ends_with(name, "running_var")) {
            b.set_data(0.5 + torch::rand(b.sizes(), gen, opts));
        } else {
            b.set_data(torch::zeros_like(b));
        }
    }
}

std::vector<std::pair<std::string, torch::Tensor>> named_tensors(torch::nn::Module &m, const std::string &prefix) {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (auto &item : m.named_parameters(true)) out.emplace_back(prefix + item.key(), item.value());
    for (auto &item : m.named_buffers(true)) out.emplace_back(prefix + item.key(), item.value());
    return out;
}

}  // namespace sw
