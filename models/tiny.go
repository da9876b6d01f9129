// Package models makes, finds and describes model files: the project's tiny
// random-weight models for tests and the demo, and the models a user points at.
package models

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/atomicfile"
)

// TinySeed seeds the tiny models' weights; the same seed gives the same files.
const TinySeed = 20261125

// Tiny model locations inside the folder MakeTiny writes.
const (
	TinySDDir   = "tiny-sd"              // diffusers folder
	TinySegFile = "tiny-seg.safetensors" // segmentation U-Net
)

// tinyCorpus is the text the tiny tokenizer's merges are learned from: words
// that prompts use, so demo prompts tokenize into a few merged pieces.
const tinyCorpus = `a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus,
a watercolor painting of a sunny garden with flowers and trees, a red brick wall with a wooden door,
portrait of a woman in the city at night, a cat sitting on a chair, a dog running on the beach,
landscape with mountains and a lake under a blue sky, oil painting, digital art, studio lighting,
the background is a forest in autumn, snow, rain, sunset, sunrise, ocean, river, street, house, car,
blurry, low quality, watermark, dark, gloomy, cinematic, photo, realistic, colorful, beautiful`

const tinyMerges = 300

// SDArch is the architecture of a random-weight Stable Diffusion model: the
// diffusers configs of its UNet, VAE and text encoder.
type SDArch struct {
	UNet, VAE, TextEncoder map[string]any
}

// TinyArch is the tiny model of the tests and the demo (about 2 M parameters,
// every layer type of SD 1.x).
func TinyArch() SDArch {
	return SDArch{
		UNet: map[string]any{
			"_class_name": "UNet2DConditionModel", "sample_size": 32, "in_channels": 4, "out_channels": 4,
			"block_out_channels": []int{32, 64}, "layers_per_block": 2, "cross_attention_dim": 32,
			"attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
			"down_block_types": []string{"CrossAttnDownBlock2D", "DownBlock2D"},
			"up_block_types":   []string{"UpBlock2D", "CrossAttnUpBlock2D"},
			"flip_sin_to_cos":  true, "freq_shift": 0, "use_linear_projection": false,
		},
		VAE: vaeConfig([]int{32, 32, 32, 64}, 1),
		TextEncoder: map[string]any{
			"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 5,
		},
	}
}

// SD15Arch has the sizes of Stable Diffusion 1.5 (859.5 M UNet parameters),
// for benchmarks: the weights are random, so only speed and memory mean anything.
func SD15Arch() SDArch {
	return SDArch{
		UNet: map[string]any{
			"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
			"block_out_channels": []int{320, 640, 1280, 1280}, "layers_per_block": 2, "cross_attention_dim": 768,
			"attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
			"down_block_types": []string{"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"},
			"up_block_types":   []string{"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"},
			"flip_sin_to_cos":  true, "freq_shift": 0, "use_linear_projection": false,
		},
		VAE: vaeConfig([]int{128, 256, 512, 512}, 2),
		TextEncoder: map[string]any{
			"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
			"vocab_size": 49408, // CLIP's, so the engine's built-in tokenizer fits it
		},
	}
}

func vaeConfig(blocks []int, layers int) map[string]any {
	down := make([]string, len(blocks))
	up := make([]string, len(blocks))
	for i := range blocks {
		down[i], up[i] = "DownEncoderBlock2D", "UpDecoderBlock2D"
	}
	return map[string]any{
		"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
		"block_out_channels": blocks, "layers_per_block": layers, "norm_num_groups": 32,
		"sample_size": 512, "scaling_factor": 0.18215, "down_block_types": down, "up_block_types": up,
	}
}

// MakeTiny writes the tiny Stable Diffusion model (diffusers layout, every
// component, tokenizer included) and the tiny segmentation U-Net under dir.
// The output is deterministic. It returns the two paths.
func MakeTiny(lib *binding.Library, dir string) (sdDir, segPath string, err error) {
	sdDir = filepath.Join(dir, TinySDDir)
	segPath = filepath.Join(dir, TinySegFile)
	if err := MakeRandomSD(lib, sdDir, TinyArch(), TinySeed); err != nil {
		return "", "", err
	}
	arch := binding.SegArch{InChannels: 3, Classes: 2, BaseWidth: 8}
	if err := lib.WriteRandomSeg(segPath, arch, TinySeed); err != nil {
		return "", "", err
	}
	return sdDir, segPath, nil
}

// MakeRandomSD writes a random-weight Stable Diffusion model of the given
// architecture in the diffusers layout, with the tiny tokenizer.
func MakeRandomSD(lib *binding.Library, dir string, arch SDArch, seed uint64) error {
	if err := writeSDConfigs(dir, arch); err != nil {
		return fmt.Errorf("make model in %s: %w", dir, err)
	}
	return lib.WriteRandomSD(dir, seed)
}

func writeSDConfigs(dir string, arch SDArch) error {
	merges := TrainBPE(tinyCorpus, tinyMerges)
	bu := NewByteUnicode()
	vocab := map[string]int{}
	for _, s := range bu.Symbols {
		vocab[s] = len(vocab)
	}
	for _, s := range bu.Symbols {
		vocab[s+"</w>"] = len(vocab)
	}
	for _, m := range merges {
		if _, ok := vocab[m[0]+m[1]]; !ok {
			vocab[m[0]+m[1]] = len(vocab)
		}
	}
	vocab["<|startoftext|>"] = len(vocab)
	vocab["<|endoftext|>"] = len(vocab)

	var mergesTxt strings.Builder
	mergesTxt.WriteString("#version: 0.2\n")
	for _, m := range merges {
		mergesTxt.WriteString(m[0] + " " + m[1] + "\n")
	}

	textEncoder := map[string]any{
		"architectures": []string{"CLIPTextModel"}, "model_type": "clip_text_model",
		"vocab_size": len(vocab), "max_position_embeddings": 77, "hidden_act": "quick_gelu",
		"layer_norm_eps": 1e-5, "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
		"pad_token_id": vocab["<|endoftext|>"],
	}
	for k, v := range arch.TextEncoder {
		textEncoder[k] = v
	}
	files := map[string]any{
		"model_index.json": map[string]any{
			"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.25.1",
			"feature_extractor": []any{nil, nil}, "image_encoder": []any{nil, nil}, "safety_checker": []any{nil, nil},
			"requires_safety_checker": false,
			"scheduler":               []string{"diffusers", "PNDMScheduler"},
			"text_encoder":            []string{"transformers", "CLIPTextModel"},
			"tokenizer":               []string{"transformers", "CLIPTokenizer"},
			"unet":                    []string{"diffusers", "UNet2DConditionModel"},
			"vae":                     []string{"diffusers", "AutoencoderKL"},
		},
		"unet/config.json":         arch.UNet,
		"vae/config.json":          arch.VAE,
		"text_encoder/config.json": textEncoder,
		"tokenizer/vocab.json":     vocab,
		"tokenizer/tokenizer_config.json": map[string]any{
			"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true,
			"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
			"unk_token": "<|endoftext|>",
		},
		"tokenizer/special_tokens_map.json": map[string]any{
			"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
			"unk_token": "<|endoftext|>",
		},
		"scheduler/scheduler_config.json": map[string]any{
			"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
			"beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": false,
			"skip_prk_steps": true, "steps_offset": 1, "clip_sample": false, "trained_betas": nil,
		},
	}
	for name, v := range files {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return err
		}
		if err := atomicfile.WriteFile(filepath.Join(dir, name), append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return atomicfile.WriteFile(filepath.Join(dir, "tokenizer/merges.txt"), []byte(mergesTxt.String()), 0o644)
}
