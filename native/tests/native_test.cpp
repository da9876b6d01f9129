// Native parity tests: the engine's components, samplers and pipelines against
// the reference outputs in ../shared/fixtures (see the READMEs there). Prints
// one line per check and a closing "N passed, N failed" line.
#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <set>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "common.h"
#include "generate.h"
#include "models.h"
#include "safetensors.h"
#include "sampler.h"
#include "segment.h"
#include "tokenizer.h"
#include "unet.h"
#include "weights.h"
#include "onednn.h"

namespace {

int passed = 0, failed = 0;
std::string fixtures;

void report(bool ok, const std::string &name, const std::string &detail) {
    (ok ? passed : failed)++;
    std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
}

// Max |a - b| against tol * max(1, peak |b|), the README's criterion.
void close(const std::string &name, const torch::Tensor &got, const torch::Tensor &want, double tol) {
    auto g = got.detach().to(torch::kCPU, torch::kFloat64), w = want.to(torch::kFloat64);
    if (g.sizes() != w.sizes()) {
        std::ostringstream ss;
        ss << "shape " << g.sizes() << " != " << w.sizes();
        report(false, name, ss.str());
        return;
    }
    const double diff = (g - w).abs().max().item<double>();
    const double peak = w.abs().max().item<double>();
    const double limit = tol * std::max(1.0, peak);
    char buf[160];
    std::snprintf(buf, sizeof buf, "max|d| %.3g (limit %.3g, peak %.3g)", diff, limit, peak);
    report(diff <= limit, name, buf);
}

void run(const std::string &name, const std::function<void()> &f) {
    try {
        f();
    } catch (const std::exception &e) {
        report(false, name, std::string("exception: ") + e.what());
    }
}

std::string sd(const std::string &rel) { return fixtures + "/sd/" + rel; }

sw_sd_model *open_model(const std::string &dir, sw_dtype dtype = SW_DTYPE_F32) {
    sw_sd_model_params p{};
    p.path = dir.c_str();
    p.device = "cpu";
    p.dtype = dtype;
    return sw::open_sd_model(p);
}

void test_tokenizer() {
    sw::Tokenizer tok(sd("tiny-sd15/tokenizer"));
    auto prompts = nlohmann::json::parse(sw::read_text_file(sd("tiny-sd15/golden/prompts.json")));
    sw::SafeTensorsFile g(sd("tiny-sd15/golden/tokenizer.safetensors"));
    auto ids = g.load("input_ids");
    for (size_t i = 0; i < prompts["prompts"].size(); i++) {
        const std::string text = prompts["prompts"][i].get<std::string>();
        auto got = tok.encode_padded(text, 77);
        auto want = ids[static_cast<int64_t>(i)];
        bool ok = true;
        for (int64_t k = 0; k < 77; k++) ok = ok && got[static_cast<size_t>(k)] == want[k].item<int64_t>();
        auto tokens = tok.tokens(text);
        auto want_tokens = prompts["tokens"][i].get<std::vector<std::string>>();
        report(ok && tokens == want_tokens, "tokenizer prompt " + std::to_string(i),
               ok ? (tokens == want_tokens ? "" : "token strings differ") : "ids differ");
    }
}

// Reads a gzip file through gzip(1): the test needs no zlib of its own.
std::string gunzip(const std::string &path) {
    if (!sw::path_exists(path)) throw std::runtime_error(path + ": not found");
    std::unique_ptr<FILE, int (*)(FILE *)> in(popen(("gzip -dc '" + path + "'").c_str(), "r"), pclose);
    if (!in) throw std::runtime_error("cannot run gzip for " + path);
    std::string out;
    char buf[1 << 16];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, in.get())) > 0;) out.append(buf, n);
    return out;
}

// The built-in CLIP tokenizer against the transformers goldens, padded both
// ways, and its derived vocabulary against CLIP's vocab.json.
void test_builtin_tokenizer() {
    const std::string dir = fixtures + "/clip";
    if (!sw::path_exists(dir + "/tokenizer_golden.json")) {
        std::printf("built-in tokenizer goldens skipped: %s/tokenizer_golden.json not found\n", dir.c_str());
        return;
    }
    const sw::Tokenizer sd1(sw::ClipPad::EndOfText), sd2(sw::ClipPad::Exclamation);
    run("built-in vocabulary equals vocab.json", [&] {
        auto want = nlohmann::json::parse(gunzip(dir + "/vocab.json.gz"));
        size_t differ = 0;
        std::string first;
        for (auto it = want.begin(); it != want.end(); ++it) {
            auto got = sd1.vocab().find(it.key());
            if (got == sd1.vocab().end() || got->second != it->get<int64_t>()) {
                if (differ++ == 0) first = it.key();
            }
        }
        report(differ == 0 && sd1.vocab_size() == want.size() && sd1.vocab_size() == 49408, "built-in vocabulary equals vocab.json",
               std::to_string(sd1.vocab_size()) + " tokens vs " + std::to_string(want.size()) + ", " + std::to_string(differ) +
                   " differ" + (first.empty() ? "" : " (first: " + first + ")"));
    });
    auto golden = nlohmann::json::parse(sw::read_text_file(dir + "/tokenizer_golden.json"));
    for (size_t i = 0; i < golden.size(); i++) {
        const auto &g = golden[i];
        const std::string text = g["prompt"].get<std::string>();
        const auto want1 = g["input_ids"].get<std::vector<int64_t>>();
        // SD 2.x: the same ids with "!" (0) instead of <|endoftext|> after the first EOS.
        auto want2 = want1;
        bool eos_seen = false;
        for (auto &id : want2) {
            if (eos_seen) id = 0;
            eos_seen = eos_seen || id == sd1.eos();
        }
        auto tokens = sd1.tokens(text);
        tokens.insert(tokens.begin(), "<|startoftext|>");
        tokens.push_back("<|endoftext|>");
        const bool ok1 = sd1.encode_padded(text, 77) == want1, ok2 = sd2.encode_padded(text, 77) == want2;
        const bool ok_tokens = tokens == g["tokens"].get<std::vector<std::string>>();
        report(ok1 && ok2 && ok_tokens, "built-in tokenizer prompt " + std::to_string(i),
               std::string(ok1 ? "" : "SD 1.x ids differ ") + (ok2 ? "" : "SD 2.x ids differ ") +
                   (ok_tokens ? "" : "token strings differ"));
    }
}

void test_text_encoder(sw_sd_model *m) {
    sw::SafeTensorsFile g(sd("tiny-sd15/golden/text_encoder.safetensors"));
    auto ids = g.load("input_ids");
    close("text encoder last_hidden_state", m->text_encoder->forward(ids), g.load("last_hidden_state"), 1e-4);
    close("text encoder clip_skip_1", m->text_encoder->forward(ids, 1), g.load("clip_skip_1"), 1e-4);
}

void test_unet(sw_sd_model *m, const std::string &golden, const std::string &label) {
    sw::SafeTensorsFile g(golden);
    auto x = g.load("sample"), ctx = g.load("encoder_hidden_states");
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    for (auto [name, t] : std::vector<std::pair<std::string, double>>{
             {"out_t999", 999}, {"out_t500", 500}, {"out_t1", 1}, {"out_t713p4567", 713.4567}}) {
        if (!g.has(name)) continue;
        close(label + " " + name, m->unet->forward(x, torch::full({2}, static_cast<float>(t), opts), ctx), g.load(name), 1e-4);
    }
    close(label + " out_tvec_999_1", m->unet->forward(x, torch::tensor({999.0f, 1.0f}), ctx), g.load("out_tvec_999_1"), 1e-4);
    close(label + " out_nonsquare_t250",
          m->unet->forward(g.load("sample_nonsquare"), torch::full({1}, 250.0f, opts), ctx.slice(0, 1, 2)),
          g.load("out_nonsquare_t250"), 1e-4);
}

// FixedContext: the same bits as projecting the context at every forward,
// cross-attention's keys and values projected once and reused, another
// context tensor projected afresh, and nothing held once it ends.
void test_fixed_context(sw_sd_model *m) {
    sw::SafeTensorsFile g(sd("tiny-sd15/golden/unet.safetensors"));
    auto x = g.load("sample"), ctx = g.load("encoder_hidden_states");
    auto t = torch::full({2}, 500.0f);
    auto other = ctx.flip(1).contiguous();
    const auto want = m->unet->forward(x, t, ctx), want_other = m->unet->forward(x, t, other);
    std::vector<sw::AttentionImpl *> attns;
    for (const auto &child : m->unet->modules())
        if (auto *a = dynamic_cast<sw::AttentionImpl *>(child.get())) attns.push_back(a);
    auto held = [&] {
        int64_t n = 0;
        for (auto *a : attns) n += a->fixed_keys.defined() + a->fixed_values.defined() + a->fixed_context.defined();
        return n;
    };
    {
        const sw::FixedContext fixed(*m->unet, ctx);
        const torch::Tensor same_tensor = ctx;  // another handle on the same tensor, as each step passes it
        const auto first = m->unet->forward(x, t, ctx);
        std::vector<const c10::TensorImpl *> keys;
        for (auto *a : attns) keys.push_back(a->fixed_keys.unsafeGetTensorImpl());
        const auto second = m->unet->forward(x, t, same_tensor);
        report(torch::equal(first, want) && torch::equal(second, want), "fixed context: same bits", "");
        int64_t projected = 0;  // once: the second forward used the first's keys
        for (size_t i = 0; i < attns.size(); i++)
            projected += attns[i]->fixed_keys.defined() && attns[i]->fixed_values.defined() &&
                         attns[i]->fixed_keys.unsafeGetTensorImpl() == keys[i];
        // Half the layers are cross-attention (attn2); self-attention never
        // sees the context tensor.
        report(projected * 2 == static_cast<int64_t>(attns.size()) && projected > 0,
               "fixed context: cross-attention projects once",
               std::to_string(projected) + " of " + std::to_string(attns.size()) + " layers");
        close("fixed context: another context tensor", m->unet->forward(x, t, other), want_other, 0);
    }
    report(held() == 0, "fixed context: freed at its end", std::to_string(held()) + " tensors held");
}

// Whether /proc/cpuinfo lists any of these CPU flags.
bool cpu_has_any(std::initializer_list<const char *> flags) {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
        if (line.rfind("flags", 0) == 0) {
            line += ' ';
            for (const char *f : flags)
                if (line.find(' ' + std::string(f) + ' ') != std::string::npos) return true;
            return false;
        }
    return false;
}

// Bfloat16 dot products (AVX-512 BF16 or AMX): where oneDNN's blocked
// bfloat16 matmul has a native kernel.
bool cpu_has_bf16_dot() { return cpu_has_any({"avx512_bf16", "amx_bf16"}); }

void test_prepacked(sw_sd_model *m, const std::string &label);

// A reduced precision's UNet passes against the float32 goldens, within tol
// (relative to the output's peak, as close() takes it), and different from
// them at all: float32 itself is within 1e-5, so this tells that the reduced
// precision was applied.
void test_unet_near_float32(sw_sd_model *m, const std::string &label, double tol) {
    const auto st = sw::scalar_type(m->dtype);
    sw::SafeTensorsFile g(sd("tiny-sd15/golden/unet.safetensors"));
    auto x = g.load("sample").to(st), ctx = g.load("encoder_hidden_states").to(st);
    for (auto [out, t] : std::vector<std::pair<std::string, float>>{{"out_t999", 999}, {"out_t1", 1}}) {
        auto got = m->unet->forward(x, torch::full({2}, t), ctx).to(torch::kFloat32);
        close(label + " unet " + out, got, g.load(out), tol);
        const double d = (got - g.load(out)).abs().max().item<double>();
        report(d > 1e-3, label + " unet " + out + " differs from float32", "max|d| " + std::to_string(d));
    }
}

// bfloat16 against the float32 goldens: UNet passes, a VAE decode and encode,
// so a reduced-precision path that has gone wrong shows without a sampler's
// amplification. The limits are about twice the error measured here.
// Bytes the VAE encoder's parameters hold (placeholders take one element).
int64_t vae_encoder_bytes(sw_sd_model *m) {
    int64_t n = 0;
    for (const auto &t : m->vae->encoder->parameters()) n += static_cast<int64_t>(t.storage().nbytes());
    return n;
}

void test_bfloat16() {
    std::unique_ptr<sw_sd_model> m(open_model(sd("tiny-sd15"), SW_DTYPE_BF16));
    // The VAE encoder is loaded at its first encode (load_vae_weights), below.
    report(m->vae->load_encoder && vae_encoder_bytes(m.get()) < 1024, "bf16 vae encoder not loaded at open",
           std::to_string(vae_encoder_bytes(m.get())) + " bytes");
    test_unet_near_float32(m.get(), "bf16", 0.05);
    const auto st = torch::kBFloat16;
    sw::SafeTensorsFile v(sd("tiny-sd15/golden/vae.safetensors"));
    close("bf16 vae dec_output", m->vae->decode(v.load("dec_input").to(st)).to(torch::kFloat32), v.load("dec_output"),
          0.03);
    auto [mean, logvar] = m->vae->encode(v.load("enc_input").to(st));
    close("bf16 vae enc_mean", mean.to(torch::kFloat32), v.load("enc_mean"), 0.03);
    report(!m->vae->load_encoder && vae_encoder_bytes(m.get()) > 4096, "bf16 vae encoder loaded at its first encode",
           std::to_string(vae_encoder_bytes(m.get())) + " bytes");
    test_prepacked(m.get(), "bf16");

    // Opened on two threads, each converting whole tensors (weights.cpp), the
    // model is the one opened on one: the same outputs, bit for bit.
    const int before = at::get_num_threads();
    at::set_num_threads(2);
    std::unique_ptr<sw_sd_model> two(open_model(sd("tiny-sd15"), SW_DTYPE_BF16));
    at::set_num_threads(before);
    sw::SafeTensorsFile u(sd("tiny-sd15/golden/unet.safetensors"));
    auto x = u.load("sample").to(st), ctx = u.load("encoder_hidden_states").to(st), t = torch::full({2}, 999.0f);
    auto same = [](const std::string &what, const torch::Tensor &a, const torch::Tensor &b) {
        report(a.equal(b), "bf16 opened on two threads: " + what + " as on one",
               "max|d| " + std::to_string((a.to(torch::kFloat32) - b.to(torch::kFloat32)).abs().max().item<double>()));
    };
    same("unet", two->unet->forward(x, t, ctx), m->unet->forward(x, t, ctx));
    const auto z = v.load("dec_input").to(st), img = v.load("enc_input").to(st);
    same("vae decode", two->vae->decode(z), m->vae->decode(z));
    same("vae encode", std::get<0>(two->vae->encode(img)), mean);
    sw::SafeTensorsFile te(sd("tiny-sd15/golden/text_encoder.safetensors"));
    const auto ids = te.load("input_ids");
    same("text encoder", two->text_encoder->forward(ids), m->text_encoder->forward(ids));

    // The token table stays the file's float32, in the mapping; the rows a
    // prompt reads are converted, to the bits of a converted table's rows.
    auto &emb = m->text_encoder->token_embedding;
    report(emb->weight.scalar_type() == torch::kFloat32 && emb->rows_as == st, "bf16 token table held as stored",
           std::string(c10::toString(emb->weight.scalar_type())));
    const auto rows = emb->forward(ids);
    report(rows.scalar_type() == st && rows.equal(at::embedding(emb->weight.to(st), ids)),
           "bf16 token rows as a converted table's", std::string(c10::toString(rows.scalar_type())));
}

// int8 (the UNet's linear layers) against the float32 goldens: every UNet
// linear layer quantized, its passes within about twice the error measured
// here; the VAE, which stays float32, at float32's tolerance.
void test_int8() {
    std::unique_ptr<sw_sd_model> m(open_model(sd("tiny-sd15"), SW_DTYPE_INT8));
    int64_t linears = 0, quantized = 0;
    for (const auto &child : m->unet->modules())
        if (auto *lin = dynamic_cast<sw::LinearImpl *>(child.get())) {
            linears++;
            if (!lin->packed.isNone()) quantized++;
        }
    report(linears > 0 && quantized == linears, "int8 unet linear layers quantized",
           std::to_string(quantized) + " of " + std::to_string(linears));
    test_unet_near_float32(m.get(), "int8", 0.06);
    sw::SafeTensorsFile v(sd("tiny-sd15/golden/vae.safetensors"));
    close("int8 vae dec_output (float32)", m->vae->decode(v.load("dec_input")), v.load("dec_output"), 1e-4);
}

void test_vae(sw_sd_model *m) {
    sw::SafeTensorsFile g(sd("tiny-sd15/golden/vae.safetensors"));
    auto [mean, logvar] = m->vae->encode(g.load("enc_input"));
    close("vae enc_mean", mean, g.load("enc_mean"), 1e-4);
    close("vae enc_logvar", logvar, g.load("enc_logvar"), 1e-4);
    close("vae dec_output", m->vae->decode(g.load("dec_input")), g.load("dec_output"), 1e-4);
}

void test_samplers(sw_sd_model *m) {
    sw::SafeTensorsFile g(sd("tiny-sd15/golden/schedulers.safetensors"));
    const auto sched = sw::NoiseSchedule::from(m->scheduler_config);
    {
        auto want = g.load("alphas_cumprod");
        auto got = torch::tensor(std::vector<double>(sched.alphas_cumprod)).to(torch::kFloat32);
        close("alphas_cumprod", got, want, 1e-7);
    }
    const std::vector<std::pair<std::string, sw::SamplerKind>> kinds = {
        {"ddim", sw::SamplerKind::DDIM},          {"pndm", sw::SamplerKind::PNDM},
        {"euler", sw::SamplerKind::Euler},        {"euler_a", sw::SamplerKind::EulerAncestral},
        {"dpmpp_2m", sw::SamplerKind::DPMPP2M},   {"dpmpp_2m_karras", sw::SamplerKind::DPMPP2MKarras}};
    for (const auto &[name, kind] : kinds) {
        for (int n : {4, 10}) {
            const std::string p = name + "/n" + std::to_string(n) + "/";
            run(p, [&] {
                auto s = sw::make_sampler(kind, sched, n);
                auto ts = g.load(p + "timesteps").to(torch::kFloat64);
                auto got_ts = torch::tensor(s->timesteps()).to(torch::kFloat64);
                close(p + "timesteps", got_ts, ts, 1e-6);
                if (g.has(p + "sigmas")) {
                    std::vector<double> sig;
                    for (size_t i = 0; i <= s->size() && i < static_cast<size_t>(g.entry(p + "sigmas").shape[0]); i++)
                        sig.push_back(i < s->size() ? s->sigma(i) : 0.0);
                    auto want = g.load(p + "sigmas").slice(0, 0, static_cast<int64_t>(s->size()));
                    close(p + "sigmas", torch::tensor(std::vector<double>(sig.begin(), sig.begin() + s->size())), want, 1e-5);
                }
                close(p + "init_noise_sigma", torch::tensor(s->init_noise_sigma()), g.load(p + "init_noise_sigma"), 1e-6);
                auto x = g.load(p + "x_T");
                auto outs = g.load(p + "model_outputs"), prevs = g.load(p + "prev_samples"), ins = g.load(p + "scaled_inputs");
                at::Generator g2 = at::detail::createCPUGenerator(45);
                double worst_in = 0, worst_prev = 0;
                torch::Tensor last_x0;
                bool ok_x0 = true;
                for (size_t i = 0; i < s->size(); i++) {
                    auto idx = static_cast<int64_t>(i);
                    worst_in = std::max(worst_in, (s->scale_model_input(x, i) - ins[idx]).abs().max().item<double>());
                    auto r = s->step(outs[idx], i, x, g2);
                    worst_prev = std::max(worst_prev, (r.prev_sample - prevs[idx]).abs().max().item<double>() /
                                                          std::max(1.0, prevs[idx].abs().max().item<double>()));
                    if (g.has(p + "pred_original_samples")) {
                        auto w = g.load(p + "pred_original_samples")[idx];
                        ok_x0 = ok_x0 && (r.pred_original - w).abs().max().item<double>() <= 1e-5 * std::max(1.0, w.abs().max().item<double>());
                    }
                    x = prevs[idx];  // follow the reference so one error does not compound
                }
                report(worst_in <= 1e-5 && worst_prev <= 1e-5 && ok_x0, p + "trace",
                       "scaled_inputs " + std::to_string(worst_in) + ", prev_samples rel " + std::to_string(worst_prev) +
                           (ok_x0 ? "" : ", pred_original differs"));
                // add_noise at the first and the middle timestep.
                auto x0 = torch::randn({1, 4, 8, 8}, at::detail::createCPUGenerator(46));
                auto noise = torch::randn({1, 4, 8, 8}, at::detail::createCPUGenerator(47));
                for (size_t k : {size_t(0), size_t(n / 2)}) {
                    const std::string key = p + "add_noise_t" + std::to_string(k);
                    if (g.has(key)) close(key, s->add_noise(x0, noise, k), g.load(key), 1e-5);
                }
            });
        }
    }
}

// Runs a pipeline golden through sw::generate, checking every step's latents
// and the final image.
void test_pipeline(sw_sd_model *m, const std::string &file, const std::string &label, sw::GenerateRequest r) {
    sw::SafeTensorsFile g(file);
    auto steps = g.load("latents_steps");
    double worst = 0;
    int64_t seen = 0;
    auto hook = [&](const sw::StepEvent &ev) {
        auto w = steps[ev.step - 1];
        worst = std::max(worst, (ev.latents - w).abs().max().item<double>() / std::max(1.0, w.abs().max().item<double>()));
        seen++;
        return false;
    };
    auto out = sw::generate(*m, r, hook);
    char buf[96];
    std::snprintf(buf, sizeof buf, "%lld steps, worst relative latent error %.3g", static_cast<long long>(seen), worst);
    report(seen == steps.size(0) && worst <= 1e-3, label + " latents per step", buf);
    close(label + " image", out.pixels, g.load("image"), 1e-3);
}

void test_segmentation() {
    auto cases_of = [](const std::string &dir) {
        return nlohmann::json::parse(sw::read_text_file(dir + "/cases.json"))["cases"].size();
    };
    for (const std::string name : {"seg-unet-w8", "seg-unet-w8-bilinear"}) {
        const std::string dir = fixtures + "/seg/" + name;
        sw_seg_model_params p{};
        const std::string path = dir + "/model.safetensors";
        p.path = path.c_str();
        p.device = "cpu";
        p.dtype = SW_DTYPE_F32;
        std::unique_ptr<sw_seg_model> m(sw::open_seg_model(p));
        sw::SafeTensorsFile g(dir + "/golden.safetensors");
        for (size_t i = 0; i < cases_of(dir); i++) {
            const std::string c = "case" + std::to_string(i) + ".";
            auto input = g.load(c + "input");
            close(name + " " + c + "logits", m->net->forward(input), g.load(c + "logits"), 1e-4);
            auto full = g.load(c + "logits_full");
            sw::SegmentRequest r;
            r.input = input;
            r.out_height = full.size(2);
            r.out_width = full.size(3);
            auto out = sw::segment(*m, r);
            close(name + " " + c + "logits_full", out.logits, full, 1e-4);
            auto want = g.load(c + "mask")[0].to(torch::kUInt8);
            const double agree = (out.labels == want).to(torch::kFloat64).mean().item<double>();
            report(agree >= 0.999, name + " " + c + "mask", std::to_string(agree * 100) + "% of pixels agree");
        }
    }
}

// Multi-head attention by its formula in float64 (mask added to the scores
// where defined): what the engine's attention is held to.
torch::Tensor attention_reference(const torch::Tensor &q, const torch::Tensor &k, const torch::Tensor &v,
                                  int64_t heads, const torch::Tensor &mask = {}) {
    const auto b = q.size(0), nq = q.size(1), nk = k.size(1), dim = q.size(2) / heads;
    auto split = [&](const torch::Tensor &t, int64_t n) {
        return t.to(torch::kFloat64).reshape({b, n, heads, dim}).transpose(1, 2);
    };
    auto s = at::matmul(split(q, nq), split(k, nk).transpose(-1, -2)) / std::sqrt(static_cast<double>(dim));
    if (mask.defined()) s = s + mask.to(torch::kFloat64);
    return at::matmul(at::softmax(s, -1), split(v, nk)).transpose(1, 2).reshape({b, nq, heads * dim});
}

void test_attention_slicing() {
    auto g = at::detail::createCPUGenerator(7);
    auto q = torch::randn({2, 300, 64}, g), k = torch::randn({2, 77, 64}, g), v = torch::randn({2, 77, 64}, g);
    auto whole = sw::attention(q, k, v, 8);
    // 2 batches x 8 heads x 77 keys x 4 bytes per query row: 13 rows per slice.
    auto sliced = sw::attention(q, k, v, 8, c10::nullopt, false, 2 * 8 * 77 * 4 * 13);
    close("attention in query slices equals whole", sliced, whole, 1e-6);
    auto mask = torch::full({300, 300}, -std::numeric_limits<float>::infinity()).triu(1);
    auto self_whole = sw::attention(q, q, q, 8, mask);
    auto self_sliced = sw::attention(q, q, q, 8, mask, false, 2 * 8 * 300 * 4 * 7);
    close("masked attention in query slices equals whole", self_sliced, self_whole, 1e-6);

    // Against the formula in float64: float32, bfloat16 with and without
    // scores upcast to float32, a causal mask, blocks of 512 queries and a
    // shorter last one (1100 = 2 × 512 + 76), keys fewer than queries.
    auto big_q = torch::randn({2, 1100, 64}, g), big_k = torch::randn({2, 1100, 64}, g), big_v = torch::randn({2, 1100, 64}, g);
    auto causal = torch::full({1100, 1100}, -std::numeric_limits<float>::infinity()).triu(1);
    close("attention f32 against float64", sw::attention(big_q, k, v, 8), attention_reference(big_q, k, v, 8, {}), 1e-5);
    close("masked self-attention f32 against float64", sw::attention(big_q, big_k, big_v, 8, causal),
          attention_reference(big_q, big_k, big_v, 8, causal), 1e-5);
    // Up to 256 keys every head goes through one batched product (with a
    // causal mask too); more take the head-by-head path above.
    auto small = torch::randn({2, 200, 64}, g);
    auto causal_small = torch::full({200, 200}, -std::numeric_limits<float>::infinity()).triu(1);
    close("masked self-attention on 200 keys f32 against float64", sw::attention(small, small, small, 8, causal_small),
          attention_reference(small, small, small, 8, causal_small), 1e-5);
    // On a CPU with AVX-512 BF16 bfloat16 runs fused (test_fused_attention):
    // the path other CPUs take is checked here too.
    for (bool fused : {true, false}) {
        if (!fused && !sw::cpu_has_avx512_bf16()) continue;  // without it the first round ran that path
        sw::allow_fused_attention(fused);
        const int64_t calls = sw::fused_attention_calls();
        for (bool upcast : {false, true}) {
            const auto bf = torch::kBFloat16;
            const std::string how = std::string(upcast ? " (upcast)" : "") + (fused ? "" : " (unfused)");
            auto qb = big_q.to(bf), kb = big_k.to(bf), vb = big_v.to(bf);
            auto got = sw::attention(qb, kb, vb, 8, c10::nullopt, upcast);
            report(got.scalar_type() == bf, "attention bf16 keeps its dtype" + how, "");
            close("attention bf16 against float64" + how, got.to(torch::kFloat32), attention_reference(qb, kb, vb, 8, {}),
                  0.02);
            auto few = sw::attention(qb, k.to(bf), v.to(bf), 8, c10::nullopt, upcast);
            report(few.scalar_type() == bf, "attention bf16 on 77 keys keeps its dtype" + how, "");
            close("attention bf16 on 77 keys against float64" + how, few.to(torch::kFloat32),
                  attention_reference(qb, k.to(bf), v.to(bf), 8, {}), 0.02);
        }
        if (!fused) report(sw::fused_attention_calls() == calls, "attention bf16 with fusing disallowed runs unfused", "");
    }
    sw::allow_fused_attention(true);
}

void expect_cancel_point(const std::string &name, const std::function<void()> &f);

// attention_fused_bf16 (attention.cpp) against the formula in float64 on the
// same bfloat16 inputs, over the shapes its tiles and tails meet: SD 1.5's
// first level (blocks of 72 queries and a shorter last one; 17 tiles of 64
// keys and a chunk of 12), cross-attention's 77 keys (an odd one out of its
// pair), fewer keys than a chunk, heads of 2 to 160 dims (a partial vector of
// dims at 18), one query and one key, and peaked scores (their maximum
// matters). Then what it declines, its threads, and its cancel point.
void test_fused_attention() {
    auto g = at::detail::createCPUGenerator(11);
    const auto bf = torch::kBFloat16;
    if (!sw::cpu_has_avx512_bf16()) {
        auto q = torch::randn({1, 8, 16}, g).to(bf);
        report(!sw::attention_fused_bf16(q, q, q, 2).defined(), "fused attention declines without AVX-512 BF16", "");
        return;
    }
    struct Case {
        int64_t b, nq, nk, heads, dim;
        double query_scale;
    };
    for (const Case &c : std::vector<Case>{{2, 1100, 1100, 8, 40, 1},
                                           {1, 37, 77, 8, 40, 1},
                                           {2, 50, 5, 2, 64, 1},
                                           {1, 30, 33, 1, 160, 1},
                                           {1, 25, 17, 3, 18, 1},
                                           {2, 9, 300, 5, 2, 1},
                                           {1, 1, 1, 1, 8, 1},
                                           {1, 40, 200, 4, 40, 8}}) {
        const int64_t inner = c.heads * c.dim;
        auto q = (torch::randn({c.b, c.nq, inner}, g) * c.query_scale).to(bf);
        auto k = torch::randn({c.b, c.nk, inner}, g).to(bf), v = torch::randn({c.b, c.nk, inner}, g).to(bf);
        char name[120];
        std::snprintf(name, sizeof name, "fused attention [%lld, %lld] on %lld keys, %lld heads of %lld",
                      (long long)c.b, (long long)c.nq, (long long)c.nk, (long long)c.heads, (long long)c.dim);
        const int64_t before = sw::fused_attention_calls();
        auto got = sw::attention(q, k, v, c.heads);
        report(sw::fused_attention_calls() == before + 1 && got.scalar_type() == bf, std::string(name) + " runs fused", "");
        close(std::string(name) + " against float64", got.to(torch::kFloat32), attention_reference(q, k, v, c.heads), 0.006);
    }

    // Every score far below zero (-190 after scaling): only the true maximum,
    // not the zero of a padded key, keeps their exponentials from underflowing.
    {
        auto q = torch::full({1, 8, 80}, 30.0).to(bf), k = (-torch::ones({1, 20, 80}) + 0.01 * torch::randn({1, 20, 80}, g)).to(bf);
        auto v = torch::randn({1, 20, 80}, g).to(bf);
        close("fused attention of scores far below zero against float64", sw::attention(q, k, v, 2).to(torch::kFloat32),
              attention_reference(q, k, v, 2), 0.006);
    }

    // Not its to take: an odd head, a head wider than its tiles, float32, a
    // mask. attention() then runs its other path, still right.
    auto q = torch::randn({1, 20, 14}, g).to(bf), wide = torch::randn({1, 20, 162}, g).to(bf);
    report(!sw::attention_fused_bf16(q, q, q, 2).defined(), "fused attention declines heads of 7", "");
    close("attention on heads of 7", sw::attention(q, q, q, 2).to(torch::kFloat32), attention_reference(q, q, q, 2), 0.02);
    report(!sw::attention_fused_bf16(wide, wide, wide, 1).defined(), "fused attention declines heads of 162", "");
    report(!sw::attention_fused_bf16(q.to(torch::kFloat32), q.to(torch::kFloat32), q.to(torch::kFloat32), 2).defined(),
           "fused attention declines float32", "");
    const int64_t before = sw::fused_attention_calls();
    sw::attention(q, q, q, 1, torch::zeros({20, 20}));
    report(sw::fused_attention_calls() == before, "masked attention does not run fused", "");

    // Each block of queries is computed whole by one thread: the same bits
    // however the blocks are split.
    auto big_q = torch::randn({2, 1100, 320}, g).to(bf), big_k = torch::randn({2, 1100, 320}, g).to(bf);
    auto one = sw::attention(big_q, big_k, big_k, 8);
    const int threads = at::get_num_threads();
    at::set_num_threads(2);
    auto two = sw::attention(big_q, big_k, big_k, 8);
    at::set_num_threads(threads);
    report(at::equal(one, two), "fused attention has the same bits on 1 and 2 threads", "");
    expect_cancel_point("fused attention", [&] { sw::attention(big_q, big_k, big_k, 8); });
}

// Every convolution of a CPU model in float32 or bfloat16 holds its kernel
// once (layers.h): the UNet's in oneDNN's layout, with a one-element
// placeholder where the dense weight was; the VAE's dense, channels-last.
void test_prepacked(sw_sd_model *m, const std::string &label) {
    int64_t convs = 0, packed = 0, placeholder_bytes = 0;
    for (const auto &child : m->unet->modules()) {
        auto *conv = dynamic_cast<sw::Conv2dImpl *>(child.get());
        if (conv == nullptr) continue;
        convs++;
        // The engine's own blocked kernel where the build has oneDNN 2, else
        // libtorch's oneDNN tensor.
        const bool own = sw::onednn_built();
        if (own ? conv->blocked && !conv->packed.defined() : conv->packed.defined() && conv->packed.is_mkldnn()) packed++;
        placeholder_bytes += static_cast<int64_t>(conv->weight.storage().nbytes());
    }
    report(convs > 0 && packed == convs, label + " unet convolutions prepacked",
           std::to_string(packed) + " of " + std::to_string(convs));
    report(placeholder_bytes <= 4 * convs, label + " unet convolutions hold no dense kernel",
           std::to_string(placeholder_bytes) + " bytes in " + std::to_string(convs) + " placeholders");
    // Upsampling convolutions: as phase kernels in bfloat16 only, the UNet's
    // and the VAE's.
    int64_t upsamplers = 0, phased = 0;
    for (auto *model : {static_cast<torch::nn::Module *>(m->unet.get()), static_cast<torch::nn::Module *>(m->vae.get())})
        for (const auto &child : model->modules())
            if (auto *up = dynamic_cast<sw::Upsample2DImpl *>(child.get())) {
                upsamplers++;
                phased += up->conv->phases;
            }
    const bool want_phases = sw::scalar_type(m->dtype) == torch::kBFloat16;
    report(upsamplers > 0 && phased == (want_phases ? upsamplers : 0),
           label + (want_phases ? " upsampling kernels as phases" : " upsampling kernels 3×3"),
           std::to_string(phased) + " of " + std::to_string(upsamplers));
    // Linear layers: blocked in bfloat16 where the CPU has its dot products,
    // each then without a dense weight.
    int64_t linears = 0, blocked = 0, dense_bytes = 0;
    for (const auto &child : m->unet->modules())
        if (auto *lin = dynamic_cast<sw::LinearImpl *>(child.get())) {
            linears++;
            if (lin->blocked.empty()) continue;
            blocked++;
            dense_bytes += static_cast<int64_t>(lin->weight.storage().nbytes());
        }
    const bool want_blocked =
        sw::scalar_type(m->dtype) == torch::kBFloat16 && sw::onednn_built() && cpu_has_bf16_dot();
    report(linears > 0 && blocked == (want_blocked ? linears : 0),
           label + (want_blocked ? " unet linear layers blocked" : " unet linear layers not blocked"),
           std::to_string(blocked) + " of " + std::to_string(linears));
    report(dense_bytes <= 2 * blocked, label + " blocked linear layers hold no dense weight",
           std::to_string(dense_bytes) + " bytes");
    int64_t vae_convs = 0, channels_last = 0;
    for (const auto &child : m->vae->modules()) {
        auto *conv = dynamic_cast<sw::Conv2dImpl *>(child.get());
        if (conv == nullptr) continue;
        vae_convs++;
        const auto &w = conv->weight;
        if (!conv->prepacked() && w.storage().nbytes() == w.numel() * w.element_size() &&
            w.is_contiguous(torch::MemoryFormat::ChannelsLast) && (w.size(2) == 1 || !w.is_contiguous()))
            channels_last++;
    }
    report(vae_convs > 0 && channels_last == vae_convs, label + " vae kernels dense channels-last",
           std::to_string(channels_last) + " of " + std::to_string(vae_convs));
}

// Winograd convolutions against at::conv2d, where they apply and where not,
// and a VAE decode large enough to take them against the same decode in
// float64 (which never does).
void test_winograd(sw_sd_model *m) {
    auto gen = at::detail::createCPUGenerator(5);
    if (!sw::onednn_built()) {  // Debian 13's oneDNN 3, or -DSTEPWISE_WINOGRAD=OFF
        auto x = torch::randn({1, 32, 128, 128}, gen), w = torch::randn({32, 32, 3, 3}, gen);
        report(!sw::winograd_applies(x, w, {}, 1, 1), "winograd does not apply in a build without oneDNN 2", "");
        return;
    }
    struct Case {
        std::string name;
        int64_t n, c, o, h, w;
        bool channels_last, bias;
    };
    // The last two run in bands of rows (40 + 40 + 40 + 10; 36 × 7 + 7).
    for (const auto &k : std::vector<Case>{{"nchw", 1, 32, 32, 128, 128, false, true},
                                           {"channels-last, in bands", 1, 128, 128, 130, 128, true, true},
                                           {"no bias, batch of 2, in bands", 2, 256, 256, 259, 72, false, false}}) {
        auto x = torch::randn({k.n, k.c, k.h, k.w}, gen), w = torch::randn({k.o, k.c, 3, 3}, gen).div(10);
        torch::Tensor b = k.bias ? torch::randn({k.o}, gen) : torch::Tensor();
        if (k.channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        const std::string name = "winograd " + k.name;
        report(sw::winograd_applies(x, w, b, 1, 1), name + " applies", "");
        auto got = sw::conv2d_winograd(x, w, b);
        close(name, got, at::conv2d(x, w, b, {1, 1}, {1, 1}), 1e-5);
        report(got.is_contiguous(k.channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous),
               name + " keeps the input's memory format", "");
    }
    // Two threads at once: one takes the kept buffer, the other its own.
    {
        auto xa = torch::randn({1, 64, 160, 128}, gen), wa = torch::randn({64, 64, 3, 3}, gen).div(20);
        auto xb = torch::randn({1, 32, 128, 136}, gen), wb = torch::randn({48, 32, 3, 3}, gen).div(20);
        torch::Tensor ya, yb;
        std::thread other([&] {
            c10::InferenceMode guard;
            for (int i = 0; i < 4; i++) yb = sw::conv2d_winograd(xb, wb, {});
        });
        for (int i = 0; i < 4; i++) ya = sw::conv2d_winograd(xa, wa, {});
        other.join();
        close("winograd from two threads at once (a)", ya, at::conv2d(xa, wa, {}, {1, 1}, {1, 1}), 1e-5);
        close("winograd from two threads at once (b)", yb, at::conv2d(xb, wb, {}, {1, 1}, {1, 1}), 1e-5);
    }
    auto x = torch::randn({1, 32, 128, 128}, gen), w = torch::randn({32, 32, 3, 3}, gen), b = torch::randn({32}, gen);
    for (auto [why, applies] : std::vector<std::pair<std::string, bool>>{
             {"stride 2", sw::winograd_applies(x, w, b, 2, 1)},
             {"padding 0", sw::winograd_applies(x, w, b, 1, 0)},
             {"1x1 kernel", sw::winograd_applies(x, torch::randn({32, 32, 1, 1}), b, 1, 1)},
             {"bfloat16", sw::winograd_applies(x.to(torch::kBFloat16), w.to(torch::kBFloat16), b, 1, 1)},
             {"below 128x128", sw::winograd_applies(x.narrow(3, 0, 127), w, b, 1, 1)},
             {"3 output channels (not a multiple of 16)",
              sw::winograd_applies(x, torch::randn({3, 32, 3, 3}), torch::randn({3}), 1, 1)}})
        report(!applies, "winograd does not apply: " + why, "");

    std::unique_ptr<sw_sd_model> wide(open_model(sd("tiny-sd15")));
    wide->vae->to(torch::kFloat64);
    auto latents = torch::randn({1, 4, 16, 16}, gen);
    const int64_t before = sw::winograd_calls();
    auto got = m->vae->decode(latents);
    report(sw::winograd_calls() > before, "vae decode at 128x128 runs winograd convolutions",
           std::to_string(sw::winograd_calls() - before) + " calls");
    close("vae decode at 128x128 against float64", got, wide->vae->decode(latents.to(torch::kFloat64)), 1e-5);
}

// A generate call runs with large CPU blocks reused (ReuseCPUMemory) and
// leaves libtorch's own allocator behind it.
void test_call_reuses_memory(sw_sd_model *m) {
    sw::GenerateRequest r;
    r.prompt = "a cat";
    r.width = r.height = 64;
    r.steps = 2;
    bool swapped = true;
    sw::generate(*m, r, [&](const sw::StepEvent &) {
        swapped = swapped && c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator();
        return false;
    });
    report(swapped, "a generate call runs with the reusing allocator", "");
    report(c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator(), "libtorch's allocator is back after the call", "");
}

// Whether /proc/self/maps lists a mapping of path.
bool mapped(const std::string &path) {
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);)
        if (line.find(path) != std::string::npos) return true;
    return false;
}

// SafeTensorsFile::load: a tensor in its stored dtype on the CPU is the
// mapping's own bytes (two loads share them), outlives the file object, and
// takes the mapping with it when the last such tensor goes; another dtype is a
// copy of its own.
void test_mapped_load() {
    const std::string path = "/tmp/stepwise-native-test-mapped-" + std::to_string(::getpid()) + ".safetensors";
    auto gen = at::detail::createCPUGenerator(3);
    const auto a = torch::randn({64, 33}, gen), b = torch::randn({1000}, gen);
    sw::write_safetensors(path, {{"a", a}, {"b", b}});
    torch::Tensor first, second, converted;
    {
        sw::SafeTensorsFile f(path);
        first = f.load("a", torch::kFloat32, torch::kCPU);
        second = f.load("a", torch::kFloat32, torch::kCPU);
        converted = f.load("b", torch::kBFloat16, torch::kCPU);
    }
    report(first.data_ptr() == second.data_ptr(), "mapped load: same-dtype tensors are the mapping's bytes", "");
    report(first.equal(a), "mapped load: the tensor outlives the file object", "");
    report(converted.equal(b.to(torch::kBFloat16)), "mapped load: another dtype is converted", "");
    report(mapped(path), "mapped load: the mapping stays while a tensor uses it", "");
    first.reset();
    second.reset();
    report(!mapped(path), "mapped load: the mapping goes with the last tensor", "");
    std::remove(path.c_str());
}

// ReuseCPUMemory: a freed block comes back for a request of at least half its
// size, not for a larger or a much smaller one; blocks under kMinKeptBlock are
// never kept; at most the largest cap of those alive is kept; libtorch's
// allocator is its own again afterwards.
void test_reuse_cpu_memory() {
    using sw::ReuseCPUMemory;
    auto bytes = [](int64_t n) { return torch::empty({n}, torch::kUInt8); };
    const int64_t mib = 1 << 20;
    void *first = nullptr;
    {
        ReuseCPUMemory reuse;
        auto a = bytes(4 * mib);
        first = a.data_ptr();
        a.reset();
        auto larger = bytes(8 * mib);
        report(larger.data_ptr() != first, "reuse: a larger request gets a fresh block", "");
        auto much_smaller = bytes(3 * mib / 2);
        report(much_smaller.data_ptr() != first, "reuse: a request under half the block gets a fresh one", "");
        auto smaller = bytes(3 * mib);
        report(smaller.data_ptr() == first, "reuse: a request of at least half the block reuses it", "");
        {
            // A tight user alongside: blocks go only to requests they exceed
            // by at most an eighth, until it ends.
            smaller.reset();
            ReuseCPUMemory tight(ReuseCPUMemory::kMaxKeptBytes, ReuseCPUMemory::kMinKeptBlock,
                                 ReuseCPUMemory::kTightSlack);
            auto three = bytes(3 * mib);
            report(three.data_ptr() != first, "reuse (tight): a request an eighth under the block gets a fresh one", "");
            auto near = bytes(4 * mib - mib / 4);
            report(near.data_ptr() == first, "reuse (tight): a request within an eighth of the block reuses it", "");
        }
        const size_t before = ReuseCPUMemory::kept_bytes();
        bytes(ReuseCPUMemory::kMinKeptBlock / 2).reset();
        report(ReuseCPUMemory::kept_bytes() == before, "reuse: a block under kMinKeptBlock is not kept", "");
        // Blocks of many sizes freed while loading are not all kept.
        const int64_t block = ReuseCPUMemory::kMaxKeptBytes / 3 + 1;
        auto free_four = [&] {
            std::vector<torch::Tensor> blocks;
            for (int i = 0; i < 4; i++) blocks.push_back(bytes(block * (i + 2) / 2));
        };
        free_four();
        report(ReuseCPUMemory::kept_bytes() <= ReuseCPUMemory::kMaxKeptBytes && ReuseCPUMemory::kept_bytes() > 0,
               "reuse: at most kMaxKeptBytes are kept", std::to_string(ReuseCPUMemory::kept_bytes()) + " bytes");
        {
            ReuseCPUMemory call(ReuseCPUMemory::kCallKeptBytes, ReuseCPUMemory::kCallMinBlock);
            free_four();
            report(ReuseCPUMemory::kept_bytes() > ReuseCPUMemory::kMaxKeptBytes &&
                       ReuseCPUMemory::kept_bytes() <= ReuseCPUMemory::kCallKeptBytes,
                   "reuse: a user with a larger cap keeps more",
                   std::to_string(ReuseCPUMemory::kept_bytes()) + " bytes");
        }
        report(ReuseCPUMemory::kept_bytes() <= ReuseCPUMemory::kMaxKeptBytes,
               "reuse: its cap again once that user is gone", std::to_string(ReuseCPUMemory::kept_bytes()) + " bytes");
    }
    report(c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator(), "reuse: libtorch's allocator is back afterwards", "");
    report(ReuseCPUMemory::kept_bytes() == 0, "reuse: nothing kept afterwards", "");
    {
        ReuseCPUMemory call(ReuseCPUMemory::kCallKeptBytes, ReuseCPUMemory::kCallMinBlock);
        bytes(2 * mib).reset();
        report(ReuseCPUMemory::kept_bytes() == 0, "reuse: a call keeps no block under kCallMinBlock", "");
        bytes(ReuseCPUMemory::kCallMinBlock).reset();
        report(ReuseCPUMemory::kept_bytes() == ReuseCPUMemory::kCallMinBlock, "reuse: a call keeps one of kCallMinBlock",
               std::to_string(ReuseCPUMemory::kept_bytes()) + " bytes");
    }
}

// The own GroupNorm (+ SiLU) kernel against at::group_norm in float64 (then
// SiLU, then rounded to the input's dtype): float32 within 1e-5 of the peak,
// bfloat16 within one bfloat16 step, NCHW and channels-last, a mean far from
// zero; and where it does not apply it says so.
void test_group_norm() {
    auto gen = at::detail::createCPUGenerator(9);
    struct Case {
        std::string name;
        torch::ScalarType dtype;
        bool channels_last, silu;
    };
    for (const auto &k : std::vector<Case>{{"f32 nchw", torch::kFloat32, false, false},
                                           {"f32 nchw silu", torch::kFloat32, false, true},
                                           {"f32 channels-last silu", torch::kFloat32, true, true},
                                           {"bf16 nchw silu", torch::kBFloat16, false, true},
                                           {"bf16 channels-last", torch::kBFloat16, true, false},
                                           {"bf16 channels-last silu", torch::kBFloat16, true, true}}) {
        auto x = (torch::randn({2, 64, 24, 40}, gen) * 3 + 20).to(k.dtype);
        if (k.channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        auto w = torch::randn({64}, gen), b = torch::randn({64}, gen);
        auto got = sw::group_norm_fast(x, 32, w.to(k.dtype), b.to(k.dtype), 1e-6, k.silu);
        const std::string name = "group norm " + k.name;
        if (!got.defined()) {
            report(false, name, "does not apply");
            continue;
        }
        auto want = at::group_norm(x.to(torch::kFloat64), 32, w.to(k.dtype).to(torch::kFloat64),
                                   b.to(k.dtype).to(torch::kFloat64), 1e-6);
        if (k.silu) want = at::silu(want);
        want = want.to(k.dtype).to(torch::kFloat32);
        // One bfloat16 step at the output's magnitude: 2^-7 relative.
        close(name, got.to(torch::kFloat32), want, k.dtype == torch::kFloat32 ? 5e-6 : 1.0 / 128);
        report(got.scalar_type() == k.dtype &&
                   got.is_contiguous(k.channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous),
               name + " keeps dtype and memory format", "");
        if (k.dtype == torch::kBFloat16) {  // the float32 kernel's result, rounded to nearest even
            auto wide = sw::group_norm_fast(x.to(torch::kFloat32), 32, w.to(k.dtype).to(torch::kFloat32),
                                            b.to(k.dtype).to(torch::kFloat32), 1e-6, k.silu);
            report(torch::equal(got, wide.to(k.dtype)), name + " rounds as Tensor::to rounds", "");
        }
    }
    auto x = torch::randn({1, 64, 5, 5}, gen), w = torch::randn({64}), b = torch::randn({64});
    report(!sw::group_norm_fast(x, 32, w, b, 1e-6, false).defined(), "group norm: 25 pixels, NCHW, not applied", "");
    report(!sw::group_norm_fast(x.to(torch::kFloat64), 32, w, b, 1e-6, false).defined(),
           "group norm: float64 not applied", "");
}

// The bfloat16 LayerNorm kernel against at::layer_norm in float64, rounded:
// within one bfloat16 step, with a mean far from zero, on a non-contiguous
// input; other dtypes and row lengths are left to libtorch.
void test_layer_norm() {
    auto gen = at::detail::createCPUGenerator(10);
    for (int64_t c : {320, 1280}) {
        auto x = (torch::randn({2, 77, c}, gen) * 2 + 300).to(torch::kBFloat16);
        auto w = torch::randn({c}, gen).to(torch::kBFloat16), b = torch::randn({c}, gen).to(torch::kBFloat16);
        auto xt = x.transpose(0, 1).contiguous().transpose(0, 1);  // same values, other strides
        const std::string name = "layer norm bf16 rows of " + std::to_string(c);
        auto got = sw::layer_norm_bf16_fast(xt, w, b, 1e-5);
        if (!got.defined()) {
            report(false, name, "does not apply");
            continue;
        }
        auto want = at::layer_norm(x.to(torch::kFloat64), {c}, w.to(torch::kFloat64), b.to(torch::kFloat64), 1e-5)
                        .to(torch::kBFloat16)
                        .to(torch::kFloat32);
        close(name, got.to(torch::kFloat32), want, 1.0 / 128);
        report(got.scalar_type() == torch::kBFloat16 && got.sizes() == x.sizes(), name + " keeps dtype and shape", "");
    }
    auto w = torch::ones({12}), b = torch::zeros({12});
    report(!sw::layer_norm_bf16_fast(torch::randn({3, 12}).to(torch::kBFloat16), w, b, 1e-5).defined(),
           "layer norm: rows of 12 not applied", "");
    report(!sw::layer_norm_bf16_fast(torch::randn({3, 16}), torch::ones({16}), torch::zeros({16}), 1e-5).defined(),
           "layer norm: float32 not applied", "");
}

// Blocked bfloat16 linears (onednn.h) against float64 on the same bfloat16
// inputs: every fused operation, a weight and an input with other strides, a
// layer blocked in two parts (GEGLU's); they apply exactly where the CPU has
// bfloat16 dot products.
void test_blocked_linear() {
    const bool applies = sw::block_linears(torch::kBFloat16, torch::kCPU);
    report(applies == (sw::onednn_built() && cpu_has_bf16_dot()),
           "blocked linears apply where the build has oneDNN 2 and the CPU bfloat16 dot products",
           applies ? "applied" : "not applied");
    report(!sw::block_linears(torch::kFloat32, torch::kCPU), "blocked linears: float32 not blocked", "");
    if (!applies) return;
    auto gen = at::detail::createCPUGenerator(11);
    const auto bf = torch::kBFloat16;
    auto f64 = [](const torch::Tensor &t) { return t.to(torch::kFloat64); };
    for (auto [m, k, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{7, 40, 48}, {300, 320, 1280}}) {
        auto w = torch::randn({k, n}, gen).div(std::sqrt(static_cast<double>(k))).t();  // [n, k], transposed strides
        auto x = torch::randn({k, 2, m}, gen).to(bf).permute({1, 2, 0});                // [2, m, k], other strides
        auto b = torch::randn({n}, gen).to(bf), other = torch::randn({2, m, n}, gen).to(bf);
        auto blocked = sw::block_linear(w, bf);
        auto plain = at::linear(f64(x), f64(w.to(bf)), f64(b));
        const std::string shape = "[" + std::to_string(m) + ", " + std::to_string(k) + "] x " + std::to_string(n);
        struct Case {
            sw::LinearPost post;
            std::string name;
            torch::Tensor want;
        };
        for (const auto &c : std::vector<Case>{{sw::LinearPost::None, "", plain},
                                               {sw::LinearPost::Gelu, " gelu", at::gelu(plain)},
                                               {sw::LinearPost::Mul, " × other", plain * f64(other)},
                                               {sw::LinearPost::Add, " + other", plain + f64(other)}}) {
            auto got = sw::linear_blocked(*blocked, x, b, c.post, other);
            close("blocked linear " + shape + c.name, f64(got), c.want, 1.0 / 128);
            report(got.scalar_type() == bf && got.sizes() == plain.sizes(), "blocked linear " + shape + c.name + " shape", "");
        }
        close("blocked linear " + shape + " without bias", f64(sw::linear_blocked(*blocked, x, {})),
              at::linear(f64(x), f64(w.to(bf))), 1.0 / 128);
    }
    // A layer in two parts, as GEGLU's ff_in: each part its own rows and bias.
    sw::Linear lin(64, 96);
    lin->parts = 2;
    auto w = torch::randn({96, 64}, gen).div(8), b = torch::randn({96}, gen).to(bf);
    lin->bias.set_data(b);
    lin->block(w, bf);
    auto x = torch::randn({3, 64}, gen).to(bf);
    auto want = at::linear(f64(x), f64(w.to(bf)), f64(b));
    report(lin->blocked.size() == 2 && lin->weight.storage().nbytes() <= 2, "blocked linear in parts holds no dense weight",
           std::to_string(lin->blocked.size()) + " parts");
    close("blocked linear part 0", f64(lin->forward_part(0, x)), want.narrow(1, 0, 48), 1.0 / 128);
    close("blocked linear part 1", f64(lin->forward_part(1, x)), want.narrow(1, 48, 48), 1.0 / 128);
    close("blocked linear whole", f64(lin(x)), want, 1.0 / 128);
}

// Blocked convolutions (onednn.h) against float64 on the same rounded
// kernel and input, in both dtypes: every kind the models have (3×3 with
// stride 1 and 2, 1×1, the phase kernels' 2×2 with padding 1, the UNet's
// first with 4 channels), with and without bias, input in NCHW and
// channels-last, a kernel with other strides; the kernel back from its
// layout; and where they apply.
void test_blocked_conv() {
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
        const bool applies = sw::block_convolutions(dtype, torch::kCPU);
        const std::string dt = dtype == torch::kFloat32 ? "float32" : "bfloat16";
        report(applies == sw::onednn_built(), "blocked " + dt + " convolutions apply where the build has oneDNN 2",
               applies ? "applied" : "not applied");
        if (!applies) continue;
        auto gen = at::detail::createCPUGenerator(13);
        auto f64 = [](const torch::Tensor &t) { return t.to(torch::kFloat64); };
        struct Case {
            int64_t in, out, k, stride, padding, h, w;
            bool bias, channels_last, strided_kernel;
        };
        for (const Case &c : {Case{32, 48, 3, 1, 1, 9, 7, true, false, false}, Case{32, 32, 3, 2, 1, 9, 8, true, false, false},
                              Case{48, 32, 1, 1, 0, 5, 6, true, true, false}, Case{16, 32, 2, 1, 1, 6, 5, true, false, true},
                              Case{4, 32, 3, 1, 1, 8, 8, true, false, false}, Case{32, 16, 3, 1, 1, 3, 4, false, true, false}}) {
            auto w = torch::randn({c.out, c.in, c.k, c.k}, gen).div(std::sqrt(static_cast<double>(c.in * c.k * c.k)));
            if (c.strided_kernel) w = w.contiguous(torch::MemoryFormat::ChannelsLast);
            auto b = c.bias ? torch::randn({c.out}, gen).to(dtype) : torch::Tensor();
            auto x = torch::randn({2, c.in, c.h, c.w}, gen).to(dtype);
            if (c.channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
            auto blocked = sw::block_conv(w, dtype, c.stride, c.padding);
            auto want = at::conv2d(f64(x), f64(w.to(dtype)), c.bias ? f64(b) : torch::Tensor(), {c.stride, c.stride},
                                   {c.padding, c.padding});
            auto got = sw::conv_blocked(*blocked, x, b);
            const std::string name = "blocked " + dt + " conv " + std::to_string(c.in) + "→" + std::to_string(c.out) + " " +
                                     std::to_string(c.k) + "×" + std::to_string(c.k) + " stride " +
                                     std::to_string(c.stride) + (c.bias ? "" : " without bias") +
                                     (c.channels_last ? " channels-last input" : "") +
                                     (c.strided_kernel ? " channels-last kernel" : "");
            close(name, f64(got), want, dtype == torch::kFloat32 ? 1e-5 : 1.0 / 128);
            report(got.scalar_type() == dtype && got.is_contiguous(), name + " result dtype and layout", "");
            close(name + " kernel back", f64(sw::unblock_conv(*blocked)), f64(w.to(dtype)), 0);
        }
        auto blocked = sw::block_conv(torch::randn({16, 8, 3, 3}, gen), dtype, 1, 1);
        bool refused = false;
        try {
            sw::conv_blocked(*blocked, torch::randn({1, 9, 5, 5}, gen).to(dtype), {});
        } catch (const std::invalid_argument &) {
            refused = true;
        }
        report(refused, "blocked " + dt + " conv refuses an input with other channels", "");
    }
}

// copy_strided (onednn.h) against Tensor::to, between dtypes and memory
// formats; it copies nothing where it does not apply.
void test_copy_strided() {
    auto gen = at::detail::createCPUGenerator(14);
    auto w = torch::randn({24, 16, 3, 3}, gen);
    const auto cl = torch::MemoryFormat::ChannelsLast;
    struct Case {
        torch::Tensor src;
        torch::ScalarType dtype;
        torch::MemoryFormat format;
        std::string name;
    };
    for (const auto &c : {Case{w, torch::kBFloat16, cl, "float32 to bfloat16 channels-last"},
                          Case{w.contiguous(cl), torch::kFloat32, torch::MemoryFormat::Contiguous, "channels-last to NCHW"},
                          Case{w.to(torch::kBFloat16), torch::kFloat32, cl, "bfloat16 to float32 channels-last"}}) {
        auto dst = at::empty(c.src.sizes(), c.src.options().dtype(c.dtype).memory_format(c.format));
        const bool copied = sw::copy_strided(c.src, dst);
        report(copied == sw::onednn_built(), "copy_strided " + c.name + " applies where the build has oneDNN 2", "");
        if (copied)
            report(torch::equal(dst, c.src.to(c.dtype, false, true, c.format)) && dst.is_contiguous(c.format),
                   "copy_strided " + c.name + " equals Tensor::to", "");
    }
    auto other = at::empty({24, 16, 3, 4});
    report(!sw::copy_strided(w, other), "copy_strided refuses other sizes", "");
    auto expanded = torch::randn({1, 16, 3, 3}, gen).expand({24, 16, 3, 3});
    auto dst = at::empty({24, 16, 3, 3});
    report(!sw::copy_strided(expanded, dst), "copy_strided refuses an expanded source", "");
}

// Upsample2D with its kernel held as phase kernels (layers.h) against the 3×3
// convolution of the nearest upsampling itself, in float64 on the same
// bfloat16 weights: prepacked (the UNet's) and channels-last (the VAE's), at
// 2× and at an odd skip's size (2h - 1, the kernel recomputed); and the phase
// kernels' round trip in float32.
void test_upsample_phases() {
    auto gen = at::detail::createCPUGenerator(12);
    const auto bf = torch::kBFloat16;
    auto w = torch::randn({32, 32, 3, 3}, gen).div(16), b = torch::randn({32}, gen).div(4);
    auto back = sw::kernel_from_phases(sw::phase_kernels(w, torch::kFloat32), torch::kFloat32);
    close("phase kernels back to the 3×3 kernel (float32)", back, w, 1e-6);
    // 80 channels: a blocked kernel's phases load in two runs of rows, the
    // second shorter (kPhaseBlock).
    const std::pair<int64_t, bool> cases[] = {{32, false}, {32, true}, {80, false}};
    for (const auto &[ch, channels_last] : cases) {
        if (ch != 32) {
            w = torch::randn({ch, ch, 3, 3}, gen).div(16 * std::sqrt(ch / 32.0));
            b = torch::randn({ch}, gen).div(4);
        }
        if (!channels_last && !sw::prepack_convolutions(bf, torch::kCPU)) {
            report(true, "upsample prepacked: bfloat16 convolutions are not prepacked on this CPU", "");
            continue;
        }
        sw::Upsample2D up(ch);
        up->conv->bias.set_data(b.to(bf));
        if (channels_last) {
            up->conv->cpu_kernel = sw::Conv2dImpl::CPUKernel::ChannelsLast;
            up->conv->hold_channels_last(w, bf);
        } else {
            up->conv->prepack(w, bf);
        }
        const std::string kind =
            std::string(channels_last ? "channels-last" : "prepacked") + (ch == 32 ? "" : " " + std::to_string(ch) + " channels");
        report(up->conv->phases && up->conv->weight.size(0) == 4 * ch, "upsample " + kind + " holds phase kernels", "");
        auto wd = w.to(bf).to(torch::kFloat64), bd = b.to(bf).to(torch::kFloat64);
        for (auto [h, wid] : std::vector<std::pair<int64_t, int64_t>>{{6, 9}, {5, 5}}) {
            auto x = torch::randn({2, ch, h, wid}, gen).to(bf);
            if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
            for (bool odd : {false, true}) {
                std::vector<int64_t> size{2 * h - (odd ? 1 : 0), 2 * wid - (odd ? 1 : 0)};
                auto want = at::conv2d(at::upsample_nearest2d(x.to(torch::kFloat64), size), wd, bd, {1, 1}, {1, 1});
                auto got = odd ? up->forward(x, size) : up->forward(x);
                close("upsample " + kind + " " + std::to_string(h) + "x" + std::to_string(wid) + (odd ? " to 2n-1" : " 2x"),
                      got.to(torch::kFloat64), want, 1.0 / 64);
            }
        }
    }
}

// The vectorised softmax against libtorch's, on row lengths that are and are
// not multiples of 8, with a causal -inf mask and a large dynamic range.
void test_softmax_kernel(const std::string &kind) {
    auto g = at::detail::createCPUGenerator(3);
    for (int64_t n : {1, 7, 8, 77, 1024, 4099}) {
        auto x = torch::randn({3, 5, n}, g) * 12;
        auto want = at::softmax(x, -1);
        auto got = x.clone();
        sw::softmax_lastdim_(got);
        close(kind + "softmax rows of " + std::to_string(n), got, want, 2e-6);
    }
    auto x = torch::randn({64, 64}, g) + torch::full({64, 64}, -std::numeric_limits<float>::infinity()).triu(1);
    auto got = x.clone();
    sw::softmax_lastdim_(got);
    close(kind + "softmax with a causal -inf mask", got, at::softmax(x, -1), 2e-6);
    // bfloat16: libtorch also computes in float32 and rounds once, so the two
    // differ by at most one bfloat16 step where the float32 values straddle a
    // rounding boundary (2^-8 relative).
    for (int64_t n : {7, 77, 4099}) {
        auto xb = (torch::randn({4, n}, g) * 8).to(torch::kBFloat16);
        auto want = at::softmax(xb, -1).to(torch::kFloat32);
        auto gotb = xb.clone();
        sw::softmax_lastdim_(gotb);
        const auto w = want, d = (gotb.to(torch::kFloat32) - w).abs();
        const bool ok = (d <= w.abs() * (1.0 / 128) + 1e-30).all().item<bool>();
        report(ok, kind + "bf16 softmax rows of " + std::to_string(n) + " within one bfloat16 step",
               "max|d| " + std::to_string(d.max().item<double>()));
        // And rounded to nearest even, as Tensor::to rounds, from the same
        // float32 computation (rows of 7 and 77 end in a scalar tail).
        auto wide = xb.to(torch::kFloat32);
        sw::softmax_lastdim_(wide);
        report(torch::equal(gotb, wide.to(torch::kBFloat16)),
               kind + "bf16 softmax rows of " + std::to_string(n) + " round as Tensor::to rounds", "");
    }
}

// Both vector kernels where the CPU runs the wider one.
void test_softmax() {
    const int lanes = sw::softmax_lanes();
    report(lanes == (cpu_has_any({"avx512_bf16"}) ? 16 : 8), "softmax runs 16 lanes where the CPU has AVX-512 BF16",
           std::to_string(lanes) + " lanes");
    test_softmax_kernel(std::to_string(lanes) + " lanes: ");
    if (lanes > 8) {
        sw::limit_softmax_lanes(8);
        report(sw::softmax_lanes() == 8, "softmax narrowed to 8 lanes", "");
        test_softmax_kernel("8 lanes: ");
        sw::limit_softmax_lanes(0);
    }
}

// The engine's own kernels split their rows over libtorch's threads (the
// build compiles at::parallel_for with OpenMP): with 2 threads set, 2 run.
void test_kernel_threads() {
    const int before = at::get_num_threads();
    at::set_num_threads(2);
    const int64_t got = sw::kernel_threads();
    at::set_num_threads(before);
    report(got == 2, "the engine's CPU kernels run on libtorch's 2 threads", std::to_string(got) + " ran");
}

// This process's thread ids.
std::set<std::string> thread_ids() {
    std::set<std::string> ids;
    for (const auto &e : std::filesystem::directory_iterator("/proc/self/task")) ids.insert(e.path().filename());
    return ids;
}

// CallGuard sets up libtorch's threads once per OS thread: a call on a thread
// that has had one starts no thread (at::init_num_threads at every call rebuilt
// libtorch's pthreadpool, a new busy-waiting worker thread each time), and a
// thread count set since (sw_set_num_threads, from any thread) still applies.
void test_call_threads() {
    const int before = at::get_num_threads();
    sw::set_library_threads(2);
    { const sw::CallGuard first; }
    const auto ids = thread_ids();
    for (int i = 0; i < 5; i++) const sw::CallGuard again;
    std::string started;
    for (const auto &id : thread_ids())
        if (!ids.count(id)) started += " " + id;
    report(started.empty(), "a call on a set-up thread starts no thread", started.empty() ? "" : "started" + started);

    int seen = 0;
    std::promise<void> set_up, changed;
    std::thread other([&] {
        { const sw::CallGuard first; }
        set_up.set_value();
        changed.get_future().wait();
        const sw::CallGuard next;
        seen = at::get_num_threads();
    });
    set_up.get_future().wait();
    sw::set_library_threads(1);  // on this thread, as another caller would
    changed.set_value();
    other.join();
    report(seen == 1, "a call applies the thread count set since", std::to_string(seen) + " threads");
    sw::set_library_threads(before);
}

// Runs f with a cancel flag that is already set, as if another thread had
// called sw_*_model_cancel: it must stop with SW_CANCELLED at a cancel point.
void expect_cancel_point(const std::string &name, const std::function<void()> &f) {
    std::atomic<bool> flag{true};
    bool cancelled = false;
    std::string detail = "ran to the end";
    try {
        sw::CallGuard guard(&flag);
        f();
    } catch (const sw::Error &e) {
        cancelled = e.status() == SW_CANCELLED;
        detail = e.what();
    }
    report(cancelled, name + " has cancel points", cancelled ? "" : detail);
}

void test_cancel_points(sw_sd_model *m) {
    auto g = at::detail::createCPUGenerator(3);
    auto ids = torch::tensor(m->tokenizer->encode_padded("a cat", 77), torch::kInt64).unsqueeze(0);
    auto context = m->text_encoder->forward(ids);
    auto latents = torch::randn({1, 4, 8, 8}, g);
    expect_cancel_point("text encoder", [&] { m->text_encoder->forward(ids); });
    expect_cancel_point("unet", [&] { m->unet->forward(latents, torch::full({1}, 500.0), context); });
    expect_cancel_point("vae decoder", [&] { m->vae->decode(latents); });
    expect_cancel_point("vae encoder", [&] { m->vae->encode(torch::rand({1, 3, 64, 64}, g)); });
    expect_cancel_point("tokenizer", [&] { m->tokenizer->encode("a cat on a chair"); });
    expect_cancel_point("attention slices", [&] {
        auto q = torch::randn({1, 64, 16}, g);
        sw::attention(q, q, q, 2, c10::nullopt, false, 1 * 2 * 64 * 4 * 8);
    });
    sw_seg_model_params p{};
    const std::string path = fixtures + "/seg/seg-unet-w8/model.safetensors";
    p.path = path.c_str();
    p.device = "cpu";
    p.dtype = SW_DTYPE_F32;
    std::unique_ptr<sw_seg_model> seg(sw::open_seg_model(p));
    expect_cancel_point("segmentation u-net", [&] { seg->net->forward(torch::rand({1, 3, 32, 32}, g)); });
    // Without a cancel they run: the flag, not the guard, stops them.
    std::atomic<bool> clear{false};
    sw::CallGuard guard(&clear);
    seg->net->forward(torch::rand({1, 3, 32, 32}, g));
    m->unet->forward(latents, torch::full({1}, 500.0), context);
    report(true, "cancel points pass when no cancel was asked", "");
}

// The C++ sampler kinds are the header's sw_sampler values, by name.
void test_sampler_ids() {
    const std::vector<std::tuple<int32_t, sw::SamplerKind, std::string>> want = {
        {SW_SAMPLER_DDIM, sw::SamplerKind::DDIM, "ddim"},
        {SW_SAMPLER_EULER, sw::SamplerKind::Euler, "euler"},
        {SW_SAMPLER_EULER_A, sw::SamplerKind::EulerAncestral, "euler_a"},
        {SW_SAMPLER_DPMPP_2M, sw::SamplerKind::DPMPP2M, "dpmpp_2m"},
        {SW_SAMPLER_DPMPP_2M_KARRAS, sw::SamplerKind::DPMPP2MKarras, "dpmpp_2m_karras"},
        {SW_SAMPLER_PNDM, sw::SamplerKind::PNDM, "pndm"},
    };
    for (const auto &[id, kind, name] : want) {
        const auto got = sw::parse_sampler(id);
        report(got == kind && sw::sampler_name(got) == name, "sampler id " + std::to_string(id) + " is " + name,
               sw::sampler_name(got));
    }
    for (int32_t id : {-1, 6, 1000}) {
        bool refused = false;
        try {
            sw::parse_sampler(id);
        } catch (const sw::Error &e) {
            refused = e.status() == SW_ERR_INVALID_ARGUMENT;
        }
        report(refused, "sampler id " + std::to_string(id) + " is refused", "");
    }
}

}  // namespace

int main() {
    torch::set_num_threads(1);
    run("attention slicing", test_attention_slicing);  // needs no fixtures
    run("fused attention", test_fused_attention);
    run("softmax", test_softmax);
    run("layer norm", test_layer_norm);
    run("blocked linear", test_blocked_linear);
    run("blocked conv", test_blocked_conv);
    run("copy strided", test_copy_strided);
    run("upsample phases", test_upsample_phases);
    run("kernel threads", test_kernel_threads);
    run("call threads", test_call_threads);
    run("group norm", test_group_norm);
    run("reuse cpu memory", test_reuse_cpu_memory);
    run("mapped load", test_mapped_load);
    run("built-in tokenizer", [] {  // the README's well-known ids, with no file at hand
        const std::vector<int64_t> want = {49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407};
        auto got = sw::Tokenizer(sw::ClipPad::EndOfText).encode_padded("a photograph of an astronaut riding a horse", 77);
        got.resize(want.size());
        report(got == want, "built-in tokenizer without files", "");
    });
    run("sampler ids", test_sampler_ids);
    const char *env = std::getenv("STEPWISE_FIXTURES");
    fixtures = env ? env : SW_DEFAULT_FIXTURES;
    if (!sw::path_exists(fixtures + "/sd/README.md")) {
        std::printf("native parity tests skipped: reference fixtures not found at %s (set STEPWISE_FIXTURES)\n",
                    fixtures.c_str());
        std::printf("native: %d passed, %d failed\n", passed, failed);
        return failed == 0 ? 0 : 1;
    }
    c10::InferenceMode guard;
    run("tokenizer", test_tokenizer);
    run("built-in tokenizer goldens", test_builtin_tokenizer);
    sw_sd_model *m = nullptr;
    run("open tiny-sd15", [&] {
        m = open_model(sd("tiny-sd15"));
        // Loading swaps in an allocator that reuses freed blocks (weights.cpp)
        // and must put libtorch's own back.
        report(c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator(),
               "libtorch's CPU allocator is its own again after loading", "");
    });
    if (m) {
        run("text encoder", [&] { test_text_encoder(m); });
        run("unet", [&] { test_unet(m, sd("tiny-sd15/golden/unet.safetensors"), "unet"); });
        run("vae", [&] { test_vae(m); });
        run("fixed context", [&] { test_fixed_context(m); });
        run("samplers", [&] { test_samplers(m); });
        run("cancel points", [&] { test_cancel_points(m); });
        run("prepacked f32", [&] { test_prepacked(m, "f32"); });
        run("winograd", [&] { test_winograd(m); });
        run("call reuses memory", [&] { test_call_reuses_memory(m); });
        const std::string prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed";
        for (auto [name, kind] : std::vector<std::pair<std::string, sw::SamplerKind>>{
                 {"ddim", sw::SamplerKind::DDIM}, {"euler", sw::SamplerKind::Euler},
                 {"euler_a", sw::SamplerKind::EulerAncestral}, {"dpmpp_2m_karras", sw::SamplerKind::DPMPP2MKarras},
                 {"pndm", sw::SamplerKind::PNDM}}) {
            run("txt2img " + name, [&] {
                sw::GenerateRequest r;
                r.prompt = prompt;
                r.negative_prompt = "blurry, low quality, watermark";
                r.width = r.height = 64;
                r.steps = 4;
                r.cfg_scale = 7.5;
                r.seed = 1234;
                r.sampler = kind;
                test_pipeline(m, sd("tiny-sd15/golden/txt2img_" + name + ".safetensors"), "txt2img " + name, r);
            });
        }
        run("img2img ddim", [&] {
            sw::SafeTensorsFile g(sd("tiny-sd15/golden/img2img_ddim.safetensors"));
            sw::GenerateRequest r;
            r.prompt = "a watercolor painting of a sunny garden";
            r.negative_prompt = "dark, gloomy";
            r.width = r.height = 64;
            r.steps = 5;
            r.strength = 0.6;
            r.seed = 99;
            r.sampler = sw::SamplerKind::DDIM;
            r.init_image = g.load("init_image");
            test_pipeline(m, sd("tiny-sd15/golden/img2img_ddim.safetensors"), "img2img ddim", r);
        });
        delete m;
    }
    run("single-file checkpoint", [&] {
        sw_sd_model_params p{};
        const std::string file = sd("tiny-sd15.safetensors"), tok = sd("tiny-sd15/tokenizer");
        p.path = file.c_str();
        p.tokenizer_dir = tok.c_str();
        p.device = "cpu";
        p.dtype = SW_DTYPE_F32;
        std::unique_ptr<sw_sd_model> single(sw::open_sd_model(p));
        std::unique_ptr<sw_sd_model> folder(open_model(sd("tiny-sd15")));
        report(single->params == folder->params, "single-file parameter count",
               std::to_string(single->params) + " vs " + std::to_string(folder->params));
        sw::GenerateRequest r;
        r.prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed";
        r.negative_prompt = "blurry, low quality, watermark";
        r.width = r.height = 64;
        r.steps = 4;
        r.seed = 1234;
        r.sampler = sw::SamplerKind::DPMPP2MKarras;
        auto a = sw::generate(*single, r, nullptr), b = sw::generate(*folder, r, nullptr);
        close("single-file txt2img equals folder", a.pixels, b.pixels, 1e-6);
        close("single-file txt2img matches golden", a.pixels,
              sw::SafeTensorsFile(sd("tiny-sd15/golden/txt2img_dpmpp_2m_karras.safetensors")).load("image"), 1e-3);
    });
    run("bfloat16", test_bfloat16);
    run("int8", test_int8);
    sw_sd_model *inp = nullptr;
    run("open tiny-inpaint", [&] { inp = open_model(sd("tiny-inpaint")); });
    if (inp) {
        run("inpaint unet", [&] { test_unet(inp, sd("tiny-inpaint/golden/unet.safetensors"), "inpaint unet"); });
        run("inpaint ddim", [&] {
            sw::SafeTensorsFile g(sd("tiny-inpaint/golden/inpaint_ddim.safetensors"));
            sw::GenerateRequest r;
            r.prompt = "a red brick wall with a wooden door";
            r.negative_prompt = "blurry, low quality";
            r.width = r.height = 64;
            r.steps = 5;
            r.seed = 502;
            r.sampler = sw::SamplerKind::DDIM;
            r.init_image = g.load("init_image");
            r.mask = g.load("mask");
            test_pipeline(inp, sd("tiny-inpaint/golden/inpaint_ddim.safetensors"), "inpaint ddim", r);
        });
        delete inp;
    }
    run("segmentation", test_segmentation);
    std::printf("native: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
