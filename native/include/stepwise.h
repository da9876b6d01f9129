/*
 * stepwise.h — the one C header of the stepwise engine (libstepwise.so).
 *
 * A flat C API over the C++/libtorch engine, in the style of llama.h and
 * stable-diffusion.h:
 *
 *   - opaque handles (sw_sd_model, sw_seg_model) created and freed by the library;
 *   - parameter structs filled by sw_*_default_params(), passed by pointer;
 *     fields are only ever added at the end, and SW_ABI_VERSION is bumped whenever
 *     a layout or a signature changes;
 *   - every call that can fail returns an sw_status and fills the caller-owned
 *     sw_error passed to that same call (never a thread-local "last error": a Go
 *     goroutine may move to another OS thread between two calls);
 *   - no C++ exception ever crosses this boundary: out-of-memory and libtorch
 *     errors become statuses;
 *   - callbacks take a void* user_data and return an int32_t; non-zero asks the
 *     engine to stop;
 *   - a long call is stopped from another thread with sw_*_model_cancel, which
 *     lands inside a denoising step, not only between steps.
 *
 * Thread safety: functions marked [any thread] may be called concurrently.
 * A model handle may be used by one call at a time unless stated otherwise (a
 * second call while one runs fails with SW_ERR_INVALID_ARGUMENT); opening and
 * closing different models concurrently is safe.
 *
 * Usage:
 *
 *     sw_error err;
 *     sw_sd_model_params p;
 *     sw_sd_model_default_params(&p);
 *     p.path = "/models/sd15";
 *     p.device = "cpu";
 *     sw_sd_model *m = NULL;
 *     if (sw_sd_model_open(&p, &m, &err) != SW_OK) fprintf(stderr, "%s\n", err.message);
 *     ...
 *     sw_sd_model_close(m);
 */
#ifndef STEPWISE_H
#define STEPWISE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define SW_API __declspec(dllexport)
#else
#define SW_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on every change of a struct layout or a function signature. */
#define SW_ABI_VERSION 3

/* ---- status and errors ------------------------------------------------- */

typedef enum sw_status {
    SW_OK = 0,
    SW_ERR_INVALID_ARGUMENT = 1, /* a parameter is out of range or inconsistent */
    SW_ERR_NOT_FOUND = 2,        /* a file, folder or tensor does not exist */
    SW_ERR_IO = 3,               /* reading or writing a file failed */
    SW_ERR_FORMAT = 4,           /* a file is malformed, truncated or lies about itself */
    SW_ERR_UNSUPPORTED = 5,      /* a valid input this build cannot handle (dtype, device, architecture) */
    SW_ERR_OUT_OF_MEMORY = 6,    /* host or device memory ran out */
    SW_ERR_DEVICE = 7,           /* the device failed or is not available */
    SW_CANCELLED = 8,            /* a callback or a cancel call asked the engine to stop */
    SW_ERR_INTERNAL = 9          /* anything else; the message says what */
} sw_status;

#define SW_ERROR_MESSAGE_SIZE 2048

/* Caller-owned error, filled by the call that failed. message is always
 * NUL-terminated; on SW_OK it is the empty string. */
typedef struct sw_error {
    int32_t status; /* an sw_status */
    char message[SW_ERROR_MESSAGE_SIZE];
} sw_error;

/* ---- library ------------------------------------------------------------ */

/* [any thread] SW_ABI_VERSION of the library as built. */
SW_API int32_t sw_abi_version(void);
/* [any thread] Static strings owned by the library. */
SW_API const char *sw_version(void);       /* stepwise version, e.g. "0.1.0" */
SW_API const char *sw_torch_version(void); /* libtorch version, e.g. "1.13.1" */
SW_API const char *sw_build_info(void);    /* compiler, CUDA/MPS support, CXX11 ABI, threads, backends (and
                                              the stable-diffusion.cpp library in use, or why it is not) */

typedef enum sw_log_level {
    SW_LOG_DEBUG = 0,
    SW_LOG_INFO = 1,
    SW_LOG_WARN = 2,
    SW_LOG_ERROR = 3
} sw_log_level;

/* Log callback; message is valid only during the call. The return value is
 * ignored. It may be called from any thread that is inside a library call. */
typedef int32_t (*sw_log_callback)(int32_t level, const char *message, void *user_data);

/* [any thread] Installs the process-wide log callback (NULL: logs to stderr at
 * WARN and above). Meant to be called once, right after loading the library. */
SW_API void sw_set_log_callback(sw_log_callback callback, void *user_data);

/* [any thread] Sets the number of threads libtorch uses for intra-op
 * parallelism; 0 leaves libtorch's default. */
SW_API void sw_set_num_threads(int32_t n);

/* ---- devices ------------------------------------------------------------ */

typedef enum sw_device_kind {
    SW_DEVICE_CPU = 0,
    SW_DEVICE_CUDA = 1,
    SW_DEVICE_MPS = 2
} sw_device_kind;

typedef struct sw_device_info {
    int32_t kind;         /* an sw_device_kind */
    int32_t index;        /* the N of cuda:N; 0 otherwise */
    char id[32];          /* "cpu", "cuda:0", "mps" */
    char name[128];       /* e.g. "NVIDIA H100 80GB HBM3"; the CPU model for cpu */
    int64_t total_memory; /* bytes; host memory for cpu; -1 when unknown */
    int64_t free_memory;  /* bytes; -1 when unknown */
} sw_device_info;

/* [any thread] Number of devices present (cpu first, then cuda:0.., then mps). */
SW_API int32_t sw_device_count(void);
/* [any thread] Describes device i, 0 <= i < sw_device_count(). */
SW_API sw_status sw_device_get(int32_t i, sw_device_info *out, sw_error *err);

/* ---- data types --------------------------------------------------------- */

typedef enum sw_dtype {
    SW_DTYPE_AUTO = 0, /* float32 on cpu, float16 on cuda and mps */
    SW_DTYPE_F32 = 1,
    SW_DTYPE_F16 = 2,
    SW_DTYPE_BF16 = 3,
    /* ggml block-quantised weights: the stable-diffusion.cpp backend only */
    SW_DTYPE_Q8_0 = 4,
    SW_DTYPE_Q5_0 = 5,
    SW_DTYPE_Q4_0 = 6,
    /* libtorch on the cpu: the UNet's linear layers in int8 (per-channel
       scales, dynamic activation quantization), everything else float32 */
    SW_DTYPE_INT8 = 7
} sw_dtype;

/* ---- backends ------------------------------------------------------------ */

typedef enum sw_backend {
    SW_BACKEND_LIBTORCH = 0, /* the built-in C++/libtorch engine */
    SW_BACKEND_SDCPP = 1     /* stable-diffusion.cpp, opened at run time (see sw_backend_available) */
} sw_backend;

/* [any thread] Whether backend can be used in this process: SW_OK, or
 * SW_ERR_UNSUPPORTED with the reason in err (not built in; its library or one
 * of its symbols missing, named). The first call for sdcpp loads its library. */
SW_API sw_status sw_backend_available(int32_t backend, sw_error *err);

/* ---- loaded models ------------------------------------------------------ */

/* Memory and identity of a loaded model. */
typedef struct sw_model_info {
    int64_t param_count;  /* number of parameters */
    int64_t weight_bytes; /* bytes of parameters and buffers on the device; a lookup table left in the file
                             mapping (the text encoder's token table on the CPU: a prompt reads a few rows)
                             is not counted */
    int32_t dtype;        /* the resolved sw_dtype (never AUTO) */
    char device[32];      /* the device the weights live on */
    char arch[128];       /* e.g. "sd1 unet 4ch eps", "seg-unet 3->2 convtranspose" */
} sw_model_info;

/* ---- Stable Diffusion models -------------------------------------------- */

typedef struct sw_sd_model sw_sd_model;

typedef struct sw_sd_model_params {
    const char *path;          /* a diffusers folder (model_index.json) or a single-file .safetensors checkpoint */
    const char *tokenizer_dir; /* overrides the model's tokenizer; NULL: a diffusers folder's tokenizer/, else
                                  the built-in CLIP vocabulary (padded with "!" for SD 2.x) */
    const char *device;        /* "cpu", "cuda", "cuda:N", "mps"; NULL: "cpu" */
    int32_t dtype;             /* an sw_dtype */
    const char *vae_path;      /* replaces the model's VAE: a .safetensors file (LDM or diffusers keys) or a
                                  diffusers VAE folder, of the same architecture; NULL: the model's own */
    int32_t backend;           /* an sw_backend; SW_BACKEND_SDCPP takes device "cpu", dtype AUTO (the file's
                                  types), F32, F16, Q8_0, Q5_0 or Q4_0, and no tokenizer_dir or vae_path */
} sw_sd_model_params;

/* [any thread] Fills p with defaults (path NULL, device "cpu", dtype AUTO, vae_path NULL, backend libtorch). */
SW_API void sw_sd_model_default_params(sw_sd_model_params *p);

/* [any thread] Loads every component of a Stable Diffusion model (text encoder,
 * UNet, VAE; tokenizer and scheduler configs). Every config value is checked
 * (range, divisibility, list lengths, known names) before anything is built,
 * then every tensor's presence, dtype and shape against the configs; a bad
 * value is SW_ERR_FORMAT naming the file and the key. Only regular files are
 * read: a FIFO, device or folder where a file belongs fails at once. On
 * failure *out is NULL. */
SW_API sw_status sw_sd_model_open(const sw_sd_model_params *p, sw_sd_model **out, sw_error *err);
/* Frees the model. NULL is allowed. Not while another call uses the model. */
SW_API void sw_sd_model_close(sw_sd_model *m);
/* [any thread] Fills out for an open model. */
SW_API sw_status sw_sd_model_info(const sw_sd_model *m, sw_model_info *out, sw_error *err);
/* [any thread] Asks the call running on m (sw_sd_generate, sw_sd_tokenize) to
 * stop: it returns SW_CANCELLED at its next cancel point. Cancel points lie
 * between the blocks and layers of the UNet, VAE and text encoder, between
 * attention slices and between denoising steps, so a cancel lands within about
 * a second at any image size. Every call on m clears the request when it
 * starts: with no call running this does nothing, and a cancel that races with
 * a call's start may be cleared by it (ask again until the call returns, as
 * the Go binding does). NULL is allowed. Not after sw_sd_model_close. */
SW_API void sw_sd_model_cancel(sw_sd_model *m);

/* ---- images --------------------------------------------------------------- */

/* A plain 8-bit image: channels 3 (RGB) or 1 (gray); row y starts at
 * data + y * stride. Images passed in are borrowed for the call; images the
 * library returns are freed with the result that holds them. */
typedef struct sw_image {
    int32_t width;
    int32_t height;
    int32_t channels;
    int32_t stride;
    uint8_t *data;
} sw_image;

/* ---- generation ----------------------------------------------------------- */

typedef enum sw_sampler {
    SW_SAMPLER_DDIM = 0,
    SW_SAMPLER_EULER = 1,
    SW_SAMPLER_EULER_A = 2,
    SW_SAMPLER_DPMPP_2M = 3,
    SW_SAMPLER_DPMPP_2M_KARRAS = 4,
    SW_SAMPLER_PNDM = 5
} sw_sampler;

typedef enum sw_preview {
    SW_PREVIEW_NONE = 0,
    SW_PREVIEW_LATENT2RGB = 1, /* a linear 4->3 projection of the predicted clean latents, every step */
    SW_PREVIEW_VAE = 2         /* a VAE decode of the predicted clean latents, every preview_every steps */
} sw_preview;

/* What the step callback receives after each denoising step. */
typedef struct sw_step_info {
    int32_t step;            /* 1-based */
    int32_t steps;           /* steps this run takes (img2img: after strength) */
    double timestep;         /* the model timestep of this step */
    double sigma;            /* its noise level */
    double elapsed_seconds;  /* since the first step began */
    int32_t preview_count;   /* images in previews: the batch size, or 0 */
    const sw_image *previews; /* RGB8 at the output size; valid only during the callback */
} sw_step_info;

/* Called on the generating thread after every step; non-zero cancels: the
 * call returns SW_CANCELLED before the next step starts. To stop inside a step,
 * call sw_sd_model_cancel from another thread. */
typedef int32_t (*sw_step_callback)(const sw_step_info *info, void *user_data);

typedef struct sw_generate_params {
    const char *prompt;
    const char *negative_prompt; /* NULL: "" */
    int32_t width;               /* multiples of 8 */
    int32_t height;
    int32_t steps;               /* 1..1000 */
    int32_t batch_size;          /* 1..64 */
    float cfg_scale;             /* <= 1 disables classifier-free guidance */
    int32_t sampler;             /* an sw_sampler */
    uint64_t seed;
    const sw_image *init_image;  /* img2img / inpaint: RGB8, width x height; NULL for txt2img */
    float strength;              /* img2img / inpaint: (0, 1] */
    const sw_image *mask;        /* inpaint: gray8, width x height, white (>= 128) = repaint */
    int32_t clip_skip;           /* 0: the last text-encoder layer */
    int32_t preview;             /* an sw_preview */
    int32_t preview_every;       /* for SW_PREVIEW_VAE */
    sw_step_callback callback;   /* may be NULL */
    void *user_data;
} sw_generate_params;

typedef struct sw_generate_result {
    int32_t count;         /* images (the batch size) */
    sw_image *images;      /* RGB8, width x height */
    int32_t latent_shape[4]; /* [B, 4, H/8, W/8] */
    float *latents;        /* final latents, before division by the VAE scaling factor; NULL (and
                              latent_shape zeros) for the sdcpp backend */
    float *pixels;         /* [B, H, W, 3] in 0..1, before 8-bit quantisation */
    int32_t tokens;        /* BPE tokens of the prompt */
    int32_t truncated;     /* non-zero when the prompt was cut to fit */
    double seconds_text;
    double seconds_denoise;
    double seconds_decode;
} sw_generate_result;

/* [any thread] Defaults: 512x512, 20 steps, batch 1, cfg 7.5, Euler, strength 1, preview none. */
SW_API void sw_generate_default_params(sw_generate_params *p);

/* Runs txt2img, img2img (init_image) or inpaint (init_image + mask). The same
 * inputs give the reference pipeline's image: noise is drawn from a CPU
 * generator seeded with seed, in the reference's order. One call per model at
 * a time. On success *out holds the result, freed with sw_generate_result_free. */
SW_API sw_status sw_sd_generate(sw_sd_model *m, const sw_generate_params *p, sw_generate_result **out, sw_error *err);
/* On an SW_BACKEND_SDCPP model (so far): txt2img, img2img and inpaint (with
 * its own step count for a strength: the callback's steps says it); samplers EULER, EULER_A,
 * DPMPP_2M and DPMPP_2M_KARRAS (others SW_ERR_UNSUPPORTED); its own noise, so
 * images differ from the libtorch backend's for the same seed (seeds above
 * 2^63 are taken modulo 2^63); batch items are sampled one after another, so
 * the callback's steps is batch_size * steps and previews hold the one image
 * being sampled; seconds_denoise is the whole call; sw_sd_model_cancel lands
 * inside the running graph (UNet, text encoder or VAE) within 50 of its nodes. Calls into
 * stable-diffusion.cpp are serialised process-wide: its callbacks are globals. */
SW_API void sw_generate_result_free(sw_generate_result *r);

/* Tokenizes text with the model's tokenizer: BPE ids without BOS/EOS,
 * untruncated. Writes at most capacity ids and sets *count to the full number. */
SW_API sw_status sw_sd_tokenize(sw_sd_model *m, const char *text, int64_t *ids, int32_t capacity, int32_t *count,
                                sw_error *err);

/* ---- segmentation models ------------------------------------------------ */

typedef struct sw_seg_model sw_seg_model;

typedef struct sw_seg_model_params {
    const char *path;   /* a .safetensors file in the Pytorch-UNet layout */
    const char *device; /* as for sw_sd_model_params */
    int32_t dtype;      /* an sw_dtype */
} sw_seg_model_params;

/* [any thread] Fills p with defaults (path NULL, device "cpu", dtype F32). */
SW_API void sw_seg_model_default_params(sw_seg_model_params *p);
/* [any thread] Loads a segmentation U-Net; channel widths and classes come from
 * the weight shapes (checked: positive, bounded, each block taking what the one
 * before it gives, 1..255 classes; SW_ERR_FORMAT otherwise), bilinear vs
 * transposed-conv upsampling from the tensors present. Only a regular file is
 * read. */
SW_API sw_status sw_seg_model_open(const sw_seg_model_params *p, sw_seg_model **out, sw_error *err);
/* Frees the model. NULL is allowed. Not while another call uses the model. */
SW_API void sw_seg_model_close(sw_seg_model *m);
/* [any thread] Fills out for an open model. */
SW_API sw_status sw_seg_model_info(const sw_seg_model *m, sw_model_info *out, sw_error *err);
/* [any thread] Asks the sw_seg_segment running on m to stop, between the
 * U-Net's blocks; as sw_sd_model_cancel. */
SW_API void sw_seg_model_cancel(sw_seg_model *m);

typedef struct sw_segment_params {
    const sw_image *image;           /* RGB8: the network's input (already at its working size) */
    int32_t out_width;               /* logits are resized (bilinear) to this size before the */
    int32_t out_height;              /* decision; 0: the input's size */
    float threshold;                 /* one-class models: sigmoid(logit) > threshold is subject (0.5) */
    const int32_t *subject_classes;  /* multi-class models: classes that are subject; NULL: every class but 0 */
    int32_t subject_class_count;
    int32_t want_logits;             /* non-zero: fill result.logits */
} sw_segment_params;

typedef struct sw_segment_result {
    sw_image mask;   /* gray8 at the output size: 255 subject, 0 not */
    sw_image labels; /* gray8: the class of each pixel (argmax; 0/1 for one-class models) */
    int32_t classes;
    float *logits;   /* [1, classes, out_height, out_width] when want_logits, else NULL */
    double seconds;
} sw_segment_result;

/* [any thread] Defaults: threshold 0.5, every class but 0 is subject, output at the input size. */
SW_API void sw_segment_default_params(sw_segment_params *p);
/* Runs the segmentation U-Net on one image. One call per model at a time. */
SW_API sw_status sw_seg_segment(sw_seg_model *m, const sw_segment_params *p, sw_segment_result **out, sw_error *err);
SW_API void sw_segment_result_free(sw_segment_result *r);

/* ---- random-weight models ------------------------------------------------ */

/* [any thread] Writes deterministic random weights for the diffusers folder dir,
 * whose unet/, vae/ and text_encoder/ folders already hold config.json: one
 * safetensors file per component, float32, drawn from a CPU generator seeded
 * with seed. For tests, demos and benchmarks (the weights mean nothing). */
SW_API sw_status sw_sd_write_random_weights(const char *dir, uint64_t seed, sw_error *err);

typedef struct sw_seg_arch {
    int32_t in_channels; /* 3 for RGB */
    int32_t classes;     /* 1: sigmoid; >1: argmax */
    int32_t base_width;  /* 64 in the original project */
    int32_t bilinear;    /* non-zero: bilinear upsampling instead of ConvTranspose2d */
} sw_seg_arch;

/* [any thread] Writes a random-weight segmentation U-Net to path (.safetensors). */
SW_API sw_status sw_seg_write_random_weights(const char *path, const sw_seg_arch *arch, uint64_t seed,
                                             sw_error *err);

#ifdef __cplusplus
}
#endif

#endif /* STEPWISE_H */
