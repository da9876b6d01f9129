// The stable-diffusion.cpp backend. Built only with -DSTEPWISE_SDCPP_DIR; its
// library is opened with dlopen on first use (one symbol table, filled once),
// so a libstepwise.so built with it still loads, and its libtorch backend still
// works, on a machine without libstable-diffusion.so.
//
// stable-diffusion.cpp keeps its log, progress and preview callbacks (and the
// buffer its log lines are formatted in) in process globals, and it has no lock
// of its own: every call into it runs under one process-wide mutex, and its
// callbacks, which run on the calling thread, find the call they belong to in
// a thread-local.
#include "sdcpp.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "checkpoint.h"
#include "safetensors.h"
#include "sdcpp_config.h"

#if SW_WITH_SDCPP
#include "stable-diffusion.h"
#endif

namespace sw {

#if !SW_WITH_SDCPP

bool sdcpp_available(std::string *reason) {
    if (reason != nullptr)
        *reason = "this libstepwise was built without the sdcpp backend (cmake -DSTEPWISE_SDCPP_DIR=...)";
    return false;
}
std::string sdcpp_describe() { return "sdcpp not built"; }
sw_sd_model *open_sdcpp_model(const sw_sd_model_params &) {
    std::string reason;
    sdcpp_available(&reason);
    fail(SW_ERR_UNSUPPORTED, reason);
}
GenerateOutput sdcpp_generate(sw_sd_model &, const GenerateRequest &, const StepHook &) {
    fail(SW_ERR_UNSUPPORTED, "sdcpp backend not built");
}
void sdcpp_cancel(sw_sd_model &) {}

#else

namespace {

// The library's entry points stepwise uses, resolved by name.
struct Api {
    void *handle = nullptr;
    std::string path;   // the library that was opened
    std::string error;  // why it is unusable; empty when usable
    decltype(&::sd_ctx_params_init) ctx_params_init = nullptr;
    decltype(&::new_sd_ctx) new_ctx = nullptr;
    decltype(&::free_sd_ctx) free_ctx = nullptr;
    decltype(&::sd_img_gen_params_init) img_gen_params_init = nullptr;
    decltype(&::generate_image) generate_image = nullptr;
    decltype(&::free_sd_images) free_images = nullptr;
    decltype(&::sd_cancel_generation) cancel = nullptr;
    decltype(&::sd_set_log_callback) set_log_callback = nullptr;
    decltype(&::sd_set_progress_callback) set_progress_callback = nullptr;
    decltype(&::sd_set_preview_callback) set_preview_callback = nullptr;
    decltype(&::sd_set_backend_eval_callback) set_eval_callback = nullptr;
};

// The libraries tried, in order: $STEPWISE_SDCPP_LIB, the one the build was
// pointed at, then the loader's search path.
std::vector<std::string> candidates() {
    std::vector<std::string> out;
    if (const char *env = std::getenv("STEPWISE_SDCPP_LIB"); env != nullptr && *env != '\0') {
        out.emplace_back(env);  // an explicit choice: no fallback behind it
        return out;
    }
    out.emplace_back(SW_SDCPP_LIBRARY);
    out.emplace_back("libstable-diffusion.so");
    return out;
}

// What every sd.cpp callback belongs to: the generation running on this thread.
struct Call {
    sw_sd_model *model = nullptr;
    sd_ctx_t *ctx = nullptr;
    const GenerateRequest *request = nullptr;
    const StepHook *hook = nullptr;
    std::chrono::steady_clock::time_point start;
    // The phases as the reports tell them: text encoding runs from the start
    // to the first report of step 0, decoding from the last step to the end.
    std::chrono::steady_clock::time_point sampling_start, last_step;
    bool sampling = false;      // a report of step 0 opened sampling
    int item_steps = 0;         // the steps it announced (img2img: fewer than asked for)
    int64_t item = -1;          // the batch item being sampled: sd.cpp samples them one after another
    bool hook_cancelled = false;
    torch::Tensor preview;      // the latest preview, uint8 [B, H, W, 3], for the next step event
    int64_t previews_seen = 0;  // previews of the current step, one per batch item
};

thread_local Call *t_call = nullptr;
// The ERROR lines sd.cpp logged during this thread's call, the last two kept:
// its final line ("model metadata validation failed") often only sums up the
// one before it, which names the tensor.
struct ErrorLines {
    std::string previous, last;
    void add(const std::string &line) {
        previous = std::move(last);
        last = line;
    }
    // ": <previous>; <last>", or "" when there were none.
    std::string suffix() const {
        if (last.empty()) return "";
        return ": " + (previous.empty() ? last : previous + "; " + last);
    }
};
thread_local ErrorLines *t_errors = nullptr;

std::mutex &sd_mutex() {
    static std::mutex m;
    return m;
}

void on_log(enum sd_log_level_t level, const char *text, void *) {
    if (text == nullptr) return;
    std::string msg(text);
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == '\r')) msg.pop_back();
    sw_log_level l = SW_LOG_DEBUG;
    switch (level) {
        case SD_LOG_DEBUG:
            l = SW_LOG_DEBUG;
            break;
        case SD_LOG_INFO:
            l = SW_LOG_DEBUG;  // sd.cpp is chatty at INFO; stepwise's own INFO lines say what matters
            break;
        case SD_LOG_WARN:
            l = SW_LOG_WARN;
            break;
        case SD_LOG_ERROR:
            // Inside a call, an error line ends up in that call's error (or
            // means nothing: sd.cpp logs a cancelled run and its probing for
            // files a folder may lack as errors), so it is only debug chatter.
            l = t_errors != nullptr ? SW_LOG_DEBUG : SW_LOG_ERROR;
            // A folder is probed for files SD 1.x models lack (text_encoder_2/): not the error.
            if (t_errors != nullptr && msg.find("failed to open '") == std::string::npos) t_errors->add(msg);
            break;
    }
    log(l, "sdcpp: " + msg);
}

const Api &api();
void on_preview(int step, int frame_count, sd_image_t *frames, bool is_noisy, void *);

// A progress report is a sampling step only while sampling: sd.cpp reports
// weight loading and tiled decoding through the same callback, untagged, and
// opens the sampling of each batch item (it samples them one after another)
// with a report of step 0 and the steps it will take (img2img: fewer than
// asked for). Events count the steps of the whole batch: item i's step s is
// i * steps + s of batch * steps.
void on_progress(int step, int steps, float, void *) {
    Call *c = t_call;
    if (c == nullptr) return;
    const auto &r = *c->request;
    if (step == 0) {
        if (!c->sampling) c->sampling_start = std::chrono::steady_clock::now();
        c->sampling = true;
        c->item_steps = steps;
        c->item++;
    } else if (c->sampling && steps == c->item_steps && step >= 1 && step <= steps) {
        c->last_step = std::chrono::steady_clock::now();
        if (c->hook != nullptr && *c->hook) {
            StepEvent ev;
            ev.step = c->item * steps + step;
            ev.steps = r.batch * steps;
            ev.elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - c->start).count();
            // sd.cpp makes a preview on every step whatever interval it is
            // given (and reads its mode once per run): VAE previews are passed
            // on for the steps preview_every picks, as the libtorch backend's.
            const bool due = r.preview != SW_PREVIEW_VAE || step % r.preview_every == 0 || step == steps;
            if (due) ev.preview = c->preview;
            if ((*c->hook)(ev)) c->hook_cancelled = true;
        }
        c->preview = torch::Tensor();
    }
    // Our flag is checked here too: sd.cpp clears its own on entry to
    // generate_image, so a cancel that came before that would be lost.
    if (c->hook_cancelled || c->model->cancel.load()) api().cancel(c->ctx, SD_CANCEL_ALL);
}

// Previews come at the end of a step, before its progress report, at latent
// resolution for the projection; they are kept (sd.cpp frees its buffer on
// return) at the output size for that report.
void on_preview(int step, int frame_count, sd_image_t *frames, bool is_noisy, void *) {
    Call *c = t_call;
    if (c == nullptr || is_noisy || step < 1 || frame_count < 1 || frames == nullptr) return;
    const auto &r = *c->request;
    std::vector<torch::Tensor> imgs;
    for (int i = 0; i < frame_count; i++) {
        const sd_image_t &f = frames[i];
        if (f.data == nullptr || f.channel != 3 || f.width == 0 || f.height == 0) return;
        auto t = torch::from_blob(f.data, {int64_t(f.height), int64_t(f.width), 3}, torch::kUInt8).clone();
        if (t.size(0) != r.height || t.size(1) != r.width) {
            // Nearest-neighbour up to the output size, as a latent projection is shown.
            auto ys = (torch::arange(r.height, torch::kLong) * t.size(0)).div(r.height, "floor");
            auto xs = (torch::arange(r.width, torch::kLong) * t.size(1)).div(r.width, "floor");
            t = t.index_select(0, ys).index_select(1, xs).contiguous();
        }
        imgs.push_back(t);
    }
    c->preview = torch::stack(imgs);
}

// sd.cpp checks its cancel flag only before each UNet evaluation. To stop
// inside one, ggml is asked to hand back control every kEvalChunk graph nodes
// (computing the graph in chunks, at no measurable cost) and told to abort
// there once the call is cancelled.
constexpr int kEvalChunk = 50;

bool on_eval(struct ggml_tensor *, bool ask, void *) {
    Call *c = t_call;
    if (c == nullptr) return !ask;  // outside a generation: observe nothing, abort nothing
    if (ask) {
        static thread_local int n = 0;
        return ++n % kEvalChunk == 0;
    }
    return !(c->hook_cancelled || c->model->cancel.load());
}

Api load_api() {
    Api a;
    std::string tried;
    for (const auto &path : candidates()) {
        dlerror();
        void *h = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (h != nullptr) {
            a.handle = h;
            a.path = path;
            break;
        }
        const char *e = dlerror();
        tried += (tried.empty() ? "" : "; ") + std::string(e ? e : path + ": cannot be opened");
    }
    if (a.handle == nullptr) {
        a.error = "stable-diffusion.cpp library not found (" + tried + "); set STEPWISE_SDCPP_LIB to its path";
        return a;
    }
    auto resolve = [&](auto &fn, const char *name) {
        if (!a.error.empty()) return;
        void *sym = ::dlsym(a.handle, name);
        if (sym == nullptr) {
            a.error = a.path + ": symbol " + name + " missing (not the stable-diffusion.cpp API stepwise was built for)";
            return;
        }
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(sym);
    };
    resolve(a.ctx_params_init, "sd_ctx_params_init");
    resolve(a.new_ctx, "new_sd_ctx");
    resolve(a.free_ctx, "free_sd_ctx");
    resolve(a.img_gen_params_init, "sd_img_gen_params_init");
    resolve(a.generate_image, "generate_image");
    resolve(a.free_images, "free_sd_images");
    resolve(a.cancel, "sd_cancel_generation");
    resolve(a.set_log_callback, "sd_set_log_callback");
    resolve(a.set_progress_callback, "sd_set_progress_callback");
    resolve(a.set_preview_callback, "sd_set_preview_callback");
    resolve(a.set_eval_callback, "sd_set_backend_eval_callback");
    if (!a.error.empty()) return a;  // the handle stays open: dlclose of a C++ library is not worth the risk
    a.set_log_callback(on_log, nullptr);
    a.set_progress_callback(on_progress, nullptr);
    a.set_eval_callback(on_eval, nullptr);
    return a;
}

const Api &api() {
    static const Api a = load_api();
    return a;
}

const Api &usable_api() {
    const Api &a = api();
    if (!a.error.empty()) fail(SW_ERR_UNSUPPORTED, "sdcpp backend: " + a.error);
    return a;
}

// ---- checks before sd.cpp sees a model ----------------------------------------
//
// sd.cpp may abort the process on a model it cannot use, so what can be told
// from the files is checked first: the files are regular, their safetensors
// headers sane (offsets tiling the data, so a truncated file is caught), and
// the tensors that fix the architecture have SD 1.x's sizes.

struct Expect {
    const char *what;
    std::string key;
    std::vector<std::vector<int64_t>> shapes;  // any of these
};

std::string shape_str(const std::vector<int64_t> &s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); i++) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

void expect(const SafeTensorsFile &f, const Expect &e) {
    if (!f.has(e.key))
        fail(SW_ERR_FORMAT, f.path() + ": no tensor " + e.key + " (" + e.what +
                                "): not an SD 1.x model the sdcpp backend can use");
    const auto &got = f.entry(e.key).shape;
    for (const auto &s : e.shapes)
        if (got == s) return;
    fail(SW_ERR_UNSUPPORTED, f.path() + ": " + e.key + " (" + e.what + ") has shape " + shape_str(got) + ", want " +
                                 shape_str(e.shapes.front()) + ": the sdcpp backend takes SD 1.x models");
}

struct Counts {
    int64_t params = 0, bytes = 0;
    std::string dtype;  // the UNet's input conv's, for AUTO
};

void add_counts(const SafeTensorsFile &f, Counts &c) {
    for (const auto &[name, e] : f.entries()) {
        int64_t n = 1;
        for (auto d : e.shape) n *= d;
        c.params += n;
        c.bytes += static_cast<int64_t>(e.end - e.begin);
    }
}

void require_regular(const std::string &path) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) fail(SW_ERR_NOT_FOUND, path + ": no such file");
    if (!S_ISREG(st.st_mode)) fail(SW_ERR_IO, path + ": not a regular file");
}

const std::vector<std::vector<int64_t>> kTokenEmbedding{{49408, 768}};
const std::vector<std::vector<int64_t>> kConvIn{{320, 4, 3, 3}, {320, 9, 3, 3}};
const std::vector<std::vector<int64_t>> kConvOut{{4, 320, 3, 3}};
const std::vector<std::vector<int64_t>> kVaeOut{{3, 128, 3, 3}};

Counts check_single_file(const std::string &path) {
    const auto dot = path.find_last_of('.');
    if (dot == std::string::npos || path.substr(dot) != ".safetensors")
        fail(SW_ERR_UNSUPPORTED, path + ": the sdcpp backend opens .safetensors files and diffusers folders only");
    SafeTensorsFile f(path);
    const std::string u = "model.diffusion_model.";
    expect(f, {"text encoder token embedding", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
               kTokenEmbedding});
    expect(f, {"UNet input conv", u + "input_blocks.0.0.weight", kConvIn});
    expect(f, {"UNet output conv", u + "out.2.weight", kConvOut});
    expect(f, {"VAE output conv", "first_stage_model.decoder.conv_out.weight", kVaeOut});
    Counts c;
    add_counts(f, c);
    c.dtype = f.entry(u + "input_blocks.0.0.weight").dtype;
    return c;
}

// sd.cpp reads exactly these three files of a diffusers folder.
Counts check_diffusers(const std::string &root) {
    const std::string te = root + "/text_encoder/model.safetensors";
    const std::string unet = root + "/unet/diffusion_pytorch_model.safetensors";
    const std::string vae = root + "/vae/diffusion_pytorch_model.safetensors";
    for (const auto &p : {te, unet, vae}) require_regular(p);
    Counts c;
    {
        SafeTensorsFile f(te);
        expect(f, {"text encoder token embedding", "text_model.embeddings.token_embedding.weight", kTokenEmbedding});
        add_counts(f, c);
    }
    {
        SafeTensorsFile f(unet);
        expect(f, {"UNet input conv", "conv_in.weight", kConvIn});
        expect(f, {"UNet output conv", "conv_out.weight", kConvOut});
        add_counts(f, c);
        c.dtype = f.entry("conv_in.weight").dtype;
    }
    {
        SafeTensorsFile f(vae);
        expect(f, {"VAE output conv", "decoder.conv_out.weight", kVaeOut});
        add_counts(f, c);
    }
    return c;
}

// The weight type sd.cpp converts to on load (SD_TYPE_COUNT: keep the file's),
// and the sw_dtype the model reports.
std::pair<sd_type_t, sw_dtype> weight_type(int32_t dtype, const std::string &file_dtype) {
    switch (dtype) {
        case SW_DTYPE_AUTO:
            return {SD_TYPE_COUNT, file_dtype == "F16" ? SW_DTYPE_F16 : file_dtype == "BF16" ? SW_DTYPE_BF16 : SW_DTYPE_F32};
        case SW_DTYPE_F32:
            return {SD_TYPE_F32, SW_DTYPE_F32};
        case SW_DTYPE_F16:
            return {SD_TYPE_F16, SW_DTYPE_F16};
        case SW_DTYPE_Q8_0:
            return {SD_TYPE_Q8_0, SW_DTYPE_Q8_0};
        case SW_DTYPE_Q5_0:
            return {SD_TYPE_Q5_0, SW_DTYPE_Q5_0};
        case SW_DTYPE_Q4_0:
            return {SD_TYPE_Q4_0, SW_DTYPE_Q4_0};
        case SW_DTYPE_BF16:
        case SW_DTYPE_INT8:
            fail(SW_ERR_UNSUPPORTED, std::string("dtype ") + dtype_name(static_cast<sw_dtype>(dtype)) +
                                         ": the sdcpp backend takes auto, f32, f16, q8_0, q5_0 or q4_0");
        default:
            fail(SW_ERR_INVALID_ARGUMENT, "unknown dtype " + std::to_string(dtype) +
                                              " (the sdcpp backend takes auto, f32, f16, q8_0, q5_0 or q4_0)");
    }
}

}  // namespace

// The stable-diffusion.cpp context of an open model; freed with the model.
struct SdcppContext {
    sd_ctx_t *ctx = nullptr;
    ~SdcppContext() {
        if (ctx != nullptr) {
            std::lock_guard<std::mutex> lock(sd_mutex());
            api().free_ctx(ctx);
        }
    }
};

bool sdcpp_available(std::string *reason) {
    const Api &a = api();
    if (reason != nullptr) *reason = a.error;
    return a.error.empty();
}

std::string sdcpp_describe() {
    std::string reason;
    if (sdcpp_available(&reason)) return "sdcpp (" + api().path + ")";
    return "sdcpp unavailable (" + reason + ")";
}

sw_sd_model *open_sdcpp_model(const sw_sd_model_params &p) {
    const Api &a = usable_api();
    if (p.path == nullptr || *p.path == '\0') fail(SW_ERR_INVALID_ARGUMENT, "model path is empty");
    const std::string root = p.path;
    const std::string device = p.device ? p.device : "cpu";
    if (device != "cpu" && !device.empty())
        fail(SW_ERR_UNSUPPORTED, "device " + device + ": the sdcpp backend runs on the cpu in this build");
    if (p.tokenizer_dir != nullptr && *p.tokenizer_dir != '\0')
        fail(SW_ERR_UNSUPPORTED, "the sdcpp backend uses its built-in CLIP vocabulary; no tokenizer folder");
    if (p.vae_path != nullptr && *p.vae_path != '\0')
        fail(SW_ERR_UNSUPPORTED, "the sdcpp backend does not replace a model's VAE yet");
    if (p.dtype == SW_DTYPE_BF16 || p.dtype == SW_DTYPE_INT8 || p.dtype < SW_DTYPE_AUTO || p.dtype > SW_DTYPE_Q4_0) weight_type(p.dtype, "");
    struct stat st;
    if (::stat(root.c_str(), &st) != 0) fail(SW_ERR_NOT_FOUND, root + ": no such file or folder");
    const bool is_dir = S_ISDIR(st.st_mode);
    if (!is_dir && !S_ISREG(st.st_mode))
        fail(SW_ERR_IO, root + ": neither a regular file nor a folder (a FIFO or a device is never read)");
    const Counts counts = is_dir ? check_diffusers(root) : check_single_file(root);
    const auto [wtype, dtype] = weight_type(p.dtype, counts.dtype);

    auto m = std::make_unique<sw_sd_model>();
    m->path = root;
    m->dtype = dtype;
    m->params = counts.params;
    // As stored for auto; after a conversion, an estimate: sd.cpp leaves
    // biases, norms and 3x3 convs (under the q types) unconverted.
    const double per_param = wtype == SD_TYPE_F32    ? 4.0
                             : wtype == SD_TYPE_F16  ? 2.0
                             : wtype == SD_TYPE_Q8_0 ? 34.0 / 32
                             : wtype == SD_TYPE_Q5_0 ? 22.0 / 32
                             : wtype == SD_TYPE_Q4_0 ? 18.0 / 32
                                                     : 0.0;
    m->bytes = per_param > 0 ? static_cast<int64_t>(static_cast<double>(counts.params) * per_param) : counts.bytes;
    m->arch = std::string("sd1 (stable-diffusion.cpp") + (is_dir ? ")" : ", single file)");
    m->tokenizer = std::make_unique<Tokenizer>(ClipPad::EndOfText);
    auto holder = std::make_shared<SdcppContext>();

    sd_ctx_params_t cp;
    a.ctx_params_init(&cp);
    cp.model_path = root.c_str();  // a file or a diffusers folder alike
    cp.wtype = wtype;
    cp.eager_load = true;  // a model's weights are read (and found wanting) here, not at the first generation
    // The thread count the binding gave libtorch (--threads), so both
    // backends run on as many; sd.cpp's own default is the physical cores.
    cp.n_threads = std::max(1, at::get_num_threads());
    // sd.cpp's CPU_RNG is torch's CPU generator (mt19937 and torch's normal
    // sampling): the same seed gives the libtorch backend's initial latents
    // (measured: docs/engine.md). Its default, CUDA_RNG, is torch's CUDA one.
    cp.rng_type = CPU_RNG;
    cp.sampler_rng_type = CPU_RNG;
    ErrorLines errors;
    {
        std::lock_guard<std::mutex> lock(sd_mutex());
        t_errors = &errors;
        holder->ctx = a.new_ctx(&cp);
        t_errors = nullptr;
    }
    if (holder->ctx == nullptr)
        fail(SW_ERR_FORMAT, root + ": stable-diffusion.cpp could not load the model" + errors.suffix());
    m->sdcpp = holder;
    log(SW_LOG_INFO, "opened " + root + " (" + m->arch + ", " + std::to_string(m->params) + " params, cpu " +
                         dtype_name(m->dtype) + ")");
    return m.release();
}

namespace {

// sw_sampler -> sd.cpp's sampler and scheduler, or a clear refusal.
std::pair<sample_method_t, scheduler_t> sampler_for(SamplerKind s) {
    switch (s) {
        case SamplerKind::Euler:
            return {EULER_SAMPLE_METHOD, DISCRETE_SCHEDULER};
        case SamplerKind::EulerAncestral:
            return {EULER_A_SAMPLE_METHOD, DISCRETE_SCHEDULER};
        case SamplerKind::DPMPP2M:
            return {DPMPP2M_SAMPLE_METHOD, DISCRETE_SCHEDULER};
        case SamplerKind::DPMPP2MKarras:
            return {DPMPP2M_SAMPLE_METHOD, KARRAS_SCHEDULER};
        case SamplerKind::DDIM:
            fail(SW_ERR_UNSUPPORTED, "sampler ddim: stable-diffusion.cpp has only ddim_trailing, another schedule "
                                     "(the sdcpp backend takes euler, euler_a, dpm++2m, dpm++2m_karras)");
        case SamplerKind::PNDM:
            fail(SW_ERR_UNSUPPORTED, "sampler pndm: not in stable-diffusion.cpp "
                                     "(the sdcpp backend takes euler, euler_a, dpm++2m, dpm++2m_karras)");
    }
    fail(SW_ERR_INVALID_ARGUMENT, "unknown sampler");
}

}  // namespace

GenerateOutput sdcpp_generate(sw_sd_model &m, const GenerateRequest &r, const StepHook &hook) {
    const Api &a = usable_api();
    if (!m.sdcpp || m.sdcpp->ctx == nullptr) fail(SW_ERR_INVALID_ARGUMENT, "not an sdcpp model");
    if (r.mask.defined() && !r.init_image.defined()) fail(SW_ERR_INVALID_ARGUMENT, "a mask needs an init image");
    if (r.init_image.defined() && (r.strength <= 0 || r.strength > 1))
        fail(SW_ERR_INVALID_ARGUMENT, "strength must be in (0, 1]");
    if (r.width < 64 || r.height < 64 || r.width > 2048 || r.height > 2048 || r.width % 8 || r.height % 8)
        fail(SW_ERR_INVALID_ARGUMENT, "size " + std::to_string(r.width) + "x" + std::to_string(r.height) +
                                          ": the sdcpp backend takes multiples of 8 from 64 to 2048");
    if (r.steps < 1 || r.steps > 1000) fail(SW_ERR_INVALID_ARGUMENT, "steps must be 1..1000");
    if (r.batch < 1 || r.batch > 64) fail(SW_ERR_INVALID_ARGUMENT, "batch size must be 1..64");
    if (r.clip_skip < 0 || r.clip_skip > 11) fail(SW_ERR_INVALID_ARGUMENT, "clip skip must be 0..11");
    if (r.preview < SW_PREVIEW_NONE || r.preview > SW_PREVIEW_VAE) fail(SW_ERR_INVALID_ARGUMENT, "unknown preview mode");
    if (r.preview == SW_PREVIEW_VAE && r.preview_every < 1) fail(SW_ERR_INVALID_ARGUMENT, "preview_every must be >= 1");
    const auto [method, scheduler] = sampler_for(r.sampler);

    GenerateOutput out;
    const auto ids = m.tokenizer->encode(r.prompt);
    out.tokens = static_cast<int64_t>(ids.size());
    out.truncated = ids.size() > 75;

    sd_img_gen_params_t g;
    a.img_gen_params_init(&g);
    g.prompt = r.prompt.c_str();
    g.negative_prompt = r.negative_prompt.c_str();
    g.clip_skip = r.clip_skip == 0 ? -1 : static_cast<int>(r.clip_skip) + 1;  // sd.cpp counts the last layer as 1
    g.width = static_cast<int>(r.width);
    g.height = static_cast<int>(r.height);
    g.sample_params.guidance.txt_cfg = static_cast<float>(r.cfg_scale);
    g.sample_params.sample_method = method;
    g.sample_params.scheduler = scheduler;
    g.sample_params.sample_steps = static_cast<int>(r.steps);
    g.seed = static_cast<int64_t>(r.seed & 0x7fffffffffffffffULL);  // sd.cpp's -1 means "random"
    g.batch_count = static_cast<int>(r.batch);

    // img2img and inpaint: sd.cpp takes 8-bit images; these are the caller's
    // own bytes back (api.cpp made them floats). Without a mask, a white one:
    // repaint everything.
    torch::Tensor init_u8, mask_u8;
    if (r.init_image.defined()) {
        if (r.init_image.size(2) != r.height || r.init_image.size(3) != r.width ||
            (r.mask.defined() && (r.mask.size(2) != r.height || r.mask.size(3) != r.width)))
            fail(SW_ERR_INVALID_ARGUMENT, "the init image and mask must be " + std::to_string(r.width) + "x" +
                                              std::to_string(r.height));
        init_u8 = ((r.init_image[0].to(torch::kFloat32) + 1) * 127.5)
                      .round()
                      .clamp(0, 255)
                      .to(torch::kUInt8)
                      .permute({1, 2, 0})
                      .contiguous();
        mask_u8 = r.mask.defined() ? (r.mask[0][0].to(torch::kFloat32) * 255).round().clamp(0, 255).to(torch::kUInt8).contiguous()
                                   : torch::full({r.height, r.width}, 255, torch::kUInt8);
        g.init_image = {static_cast<uint32_t>(r.width), static_cast<uint32_t>(r.height), 3, init_u8.data_ptr<uint8_t>()};
        g.mask_image = {static_cast<uint32_t>(r.width), static_cast<uint32_t>(r.height), 1, mask_u8.data_ptr<uint8_t>()};
        g.strength = static_cast<float>(r.strength);
    }

    Call call;
    call.model = &m;
    call.ctx = m.sdcpp->ctx;
    call.request = &r;
    call.hook = &hook;
    call.start = std::chrono::steady_clock::now();
    ErrorLines errors;
    sd_image_t *images = nullptr;
    int count = 0;
    bool ok = false;
    {
        std::lock_guard<std::mutex> lock(sd_mutex());
        if (m.cancel.load()) fail(SW_CANCELLED, "cancelled");
        const preview_t mode = r.preview == SW_PREVIEW_LATENT2RGB ? PREVIEW_PROJ
                               : r.preview == SW_PREVIEW_VAE      ? PREVIEW_VAE
                                                                  : PREVIEW_NONE;
        a.set_preview_callback(on_preview, mode, 1, true, false, nullptr);
        t_call = &call;
        t_errors = &errors;
        ok = a.generate_image(m.sdcpp->ctx, &g, &images, &count);
        t_call = nullptr;
        t_errors = nullptr;
        a.set_preview_callback(nullptr, PREVIEW_NONE, 1, false, false, nullptr);
    }
    const auto end = std::chrono::steady_clock::now();
    std::vector<torch::Tensor> imgs;
    bool bad = false;
    for (int i = 0; ok && images != nullptr && i < count; i++) {
        const sd_image_t &im = images[i];
        if (im.data == nullptr || im.channel != 3 || int64_t(im.width) != r.width || int64_t(im.height) != r.height) {
            bad = true;
            break;
        }
        imgs.push_back(torch::from_blob(im.data, {r.height, r.width, 3}, torch::kUInt8).clone());
    }
    if (images != nullptr) a.free_images(images, count);
    if (call.hook_cancelled || m.cancel.load()) fail(SW_CANCELLED, "cancelled");
    if (!ok || images == nullptr)
        fail(SW_ERR_INTERNAL, "stable-diffusion.cpp: generate_image failed" + errors.suffix());
    if (bad || static_cast<int64_t>(imgs.size()) != r.batch)
        fail(SW_ERR_INTERNAL, "stable-diffusion.cpp returned " + std::to_string(count) +
                                  " images of another size or format than asked for");
    out.images = torch::stack(imgs);
    out.pixels = out.images.to(torch::kFloat32) / 255.0;
    // sd.cpp does not time its phases for a caller; its progress reports
    // mark where sampling starts and ends (the prompt is encoded once before
    // the first batch item, every item is decoded after the last).
    using secs = std::chrono::duration<double>;
    out.seconds_text = secs(call.sampling_start - call.start).count();
    out.seconds_denoise = secs(call.last_step - call.sampling_start).count();
    out.seconds_decode = secs(end - call.last_step).count();
    return out;
}

void sdcpp_cancel(sw_sd_model &m) {
    if (m.sdcpp && m.sdcpp->ctx != nullptr && api().error.empty()) api().cancel(m.sdcpp->ctx, SD_CANCEL_ALL);
}

#endif  // SW_WITH_SDCPP

}  // namespace sw
