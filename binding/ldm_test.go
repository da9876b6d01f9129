package binding_test

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The tests need single-file checkpoints in the original LDM layout, as users
// download them; this writes one from a diffusers folder's weights (the
// inverse of the engine's key mapping), streaming tensor bytes so an SD 1.5
// sized model costs no more memory than a buffer.

type stEntry struct {
	DType   string   `json:"dtype"`
	Shape   []int64  `json:"shape"`
	Offsets [2]int64 `json:"data_offsets"`
}

// stHeader reads the header of a safetensors file: its entries and where the data starts.
func stHeader(t *testing.T, path string) (map[string]stEntry, int64) {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var n uint64
	require.NoError(t, binary.Read(f, binary.LittleEndian, &n))
	b := make([]byte, n)
	_, err = io.ReadFull(f, b)
	require.NoError(t, err)
	var raw map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(b, &raw))
	out := map[string]stEntry{}
	for k, v := range raw {
		if k == "__metadata__" {
			continue
		}
		var e stEntry
		require.NoError(t, json.Unmarshal(v, &e))
		out[k] = e
	}
	return out, int64(8 + n)
}

// ldmTensor is one tensor of the output: its source file, entry and the
// shape it is written with.
type ldmTensor struct {
	src   string
	start int64
	entry stEntry
	shape []int64
}

// ldmParts say which components of a diffusers folder to write, and the
// VAE's key prefix ("first_stage_model." in full checkpoints).
type ldmParts struct {
	unet, textEncoder, vae bool
	vaePrefix              string
}

var (
	reUNetMidRes   = regexp.MustCompile(`^mid_block\.resnets\.(\d+)\.(.*)$`)
	reUNetDownRes  = regexp.MustCompile(`^down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$`)
	reUNetDownAttn = regexp.MustCompile(`^down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$`)
	reUNetDownS    = regexp.MustCompile(`^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$`)
	reUNetUpRes    = regexp.MustCompile(`^up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$`)
	reUNetUpAttn   = regexp.MustCompile(`^up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$`)
	reUNetUpS      = regexp.MustCompile(`^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$`)

	reVAEDownRes = regexp.MustCompile(`^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$`)
	reVAEDownS   = regexp.MustCompile(`^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$`)
	reVAEUpRes   = regexp.MustCompile(`^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$`)
	reVAEUpS     = regexp.MustCompile(`^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$`)
	reVAEMidRes  = regexp.MustCompile(`^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)$`)
	reVAEMidAttn = regexp.MustCompile(`^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)$`)
	reVAENormOut = regexp.MustCompile(`^(encoder|decoder)\.conv_norm_out\.(.*)$`)
)

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

func renamePrefix(s string, pairs ...string) string {
	for i := 0; i < len(pairs); i += 2 {
		if strings.HasPrefix(s, pairs[i]) {
			return pairs[i+1] + s[len(pairs[i]):]
		}
	}
	return s
}

func unetResnet(rest string) string {
	return renamePrefix(rest, "norm1.", "in_layers.0.", "conv1.", "in_layers.2.", "norm2.", "out_layers.0.",
		"conv2.", "out_layers.3.", "time_emb_proj.", "emb_layers.1.", "conv_shortcut.", "skip_connection.")
}

// unetKey maps a diffusers UNet name to its LDM key (without model.diffusion_model.);
// n is layers_per_block; upAttn says which up blocks have attentions.
func unetKey(name string, n int, upAttn map[int]bool) string {
	if k := renamePrefix(name, "time_embedding.linear_1.", "time_embed.0.", "time_embedding.linear_2.", "time_embed.2.",
		"conv_in.", "input_blocks.0.0.", "conv_norm_out.", "out.0.", "conv_out.", "out.2.",
		"mid_block.attentions.0.", "middle_block.1."); k != name {
		return k
	}
	if m := reUNetMidRes.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("middle_block.%d.%s", 2*atoi(m[1]), unetResnet(m[2]))
	}
	if m := reUNetDownRes.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("input_blocks.%d.0.%s", 1+atoi(m[1])*(n+1)+atoi(m[2]), unetResnet(m[3]))
	}
	if m := reUNetDownAttn.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("input_blocks.%d.1.%s", 1+atoi(m[1])*(n+1)+atoi(m[2]), m[3])
	}
	if m := reUNetDownS.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("input_blocks.%d.0.op.%s", 1+atoi(m[1])*(n+1)+n, m[2])
	}
	if m := reUNetUpRes.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("output_blocks.%d.0.%s", atoi(m[1])*(n+1)+atoi(m[2]), unetResnet(m[3]))
	}
	if m := reUNetUpAttn.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("output_blocks.%d.1.%s", atoi(m[1])*(n+1)+atoi(m[2]), m[3])
	}
	if m := reUNetUpS.FindStringSubmatch(name); m != nil {
		sub := 1 // after the resnet, or after resnet + attention
		if upAttn[atoi(m[1])] {
			sub = 2
		}
		return fmt.Sprintf("output_blocks.%d.%d.conv.%s", atoi(m[1])*(n+1)+n, sub, m[2])
	}
	return ""
}

// vaeKey maps a diffusers VAE name to its LDM key; levels is the number of blocks.
func vaeKey(name string, levels int) string {
	res := func(rest string) string { return renamePrefix(rest, "conv_shortcut.", "nin_shortcut.") }
	if m := reVAEDownRes.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("encoder.down.%s.block.%s.%s", m[1], m[2], res(m[3]))
	}
	if m := reVAEDownS.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("encoder.down.%s.downsample.conv.%s", m[1], m[2])
	}
	if m := reVAEUpRes.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("decoder.up.%d.block.%s.%s", levels-1-atoi(m[1]), m[2], res(m[3]))
	}
	if m := reVAEUpS.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("decoder.up.%d.upsample.conv.%s", levels-1-atoi(m[1]), m[2])
	}
	if m := reVAEMidRes.FindStringSubmatch(name); m != nil {
		return fmt.Sprintf("%s.mid.block_%d.%s", m[1], atoi(m[2])+1, res(m[3]))
	}
	if m := reVAEMidAttn.FindStringSubmatch(name); m != nil {
		to := map[string]string{"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
		return fmt.Sprintf("%s.mid.attn_1.%s.%s", m[1], to[m[2]], m[3])
	}
	if m := reVAENormOut.FindStringSubmatch(name); m != nil {
		return m[1] + ".norm_out." + m[2]
	}
	return name // conv_in, conv_out, quant_conv, post_quant_conv
}

// writeLDM writes the chosen parts of the diffusers folder dir to out in the
// LDM layout (SD 1.x: transformers CLIP under cond_stage_model.transformer.).
func writeLDM(t *testing.T, dir, out string, parts ldmParts) {
	t.Helper()
	tensors := map[string]ldmTensor{}
	add := func(key, src string, start int64, e stEntry, shape []int64) {
		_, dup := tensors[key]
		require.False(t, dup, "two tensors map to %s", key)
		tensors[key] = ldmTensor{src: src, start: start, entry: e, shape: shape}
	}
	if parts.unet {
		src := filepath.Join(dir, "unet/diffusion_pytorch_model.safetensors")
		h, start := stHeader(t, src)
		var cfg struct {
			LayersPerBlock int `json:"layers_per_block"`
		}
		b, err := os.ReadFile(filepath.Join(dir, "unet/config.json"))
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(b, &cfg))
		upAttn := map[int]bool{}
		for name := range h {
			if m := reUNetUpAttn.FindStringSubmatch(name); m != nil {
				upAttn[atoi(m[1])] = true
			}
		}
		for name, e := range h {
			k := unetKey(name, cfg.LayersPerBlock, upAttn)
			require.NotEmpty(t, k, "no LDM key for UNet tensor %s", name)
			add("model.diffusion_model."+k, src, start, e, e.Shape)
		}
	}
	if parts.textEncoder {
		src := filepath.Join(dir, "text_encoder/model.safetensors")
		h, start := stHeader(t, src)
		for name, e := range h {
			add("cond_stage_model.transformer."+name, src, start, e, e.Shape)
		}
	}
	if parts.vae {
		src := filepath.Join(dir, "vae/diffusion_pytorch_model.safetensors")
		h, start := stHeader(t, src)
		levels := 0
		for name := range h {
			if m := reVAEDownRes.FindStringSubmatch(name); m != nil && atoi(m[1])+1 > levels {
				levels = atoi(m[1]) + 1
			}
		}
		for name, e := range h {
			shape := e.Shape
			if reVAEMidAttn.MatchString(name) && strings.HasSuffix(name, ".weight") && len(shape) == 2 {
				shape = []int64{shape[0], shape[1], 1, 1} // LDM's attention projections are 1x1 convolutions
			}
			add(parts.vaePrefix+vaeKey(name, levels), src, start, e, shape)
		}
	}

	names := make([]string, 0, len(tensors))
	for k := range tensors {
		names = append(names, k)
	}
	sort.Strings(names)
	header := map[string]stEntry{}
	var off int64
	for _, k := range names {
		tt := tensors[k]
		size := tt.entry.Offsets[1] - tt.entry.Offsets[0]
		header[k] = stEntry{DType: tt.entry.DType, Shape: tt.shape, Offsets: [2]int64{off, off + size}}
		off += size
	}
	hb, err := json.Marshal(header)
	require.NoError(t, err)
	for (len(hb)+8)%8 != 0 {
		hb = append(hb, ' ')
	}
	f, err := os.Create(out)
	require.NoError(t, err)
	defer f.Close()
	w := bufio.NewWriterSize(f, 1<<20)
	require.NoError(t, binary.Write(w, binary.LittleEndian, uint64(len(hb))))
	_, err = w.Write(hb)
	require.NoError(t, err)
	files := map[string]*os.File{}
	defer func() {
		for _, sf := range files {
			sf.Close()
		}
	}()
	for _, k := range names {
		tt := tensors[k]
		sf := files[tt.src]
		if sf == nil {
			sf, err = os.Open(tt.src)
			require.NoError(t, err)
			files[tt.src] = sf
		}
		size := tt.entry.Offsets[1] - tt.entry.Offsets[0]
		_, err = io.Copy(w, io.NewSectionReader(sf, tt.start+tt.entry.Offsets[0], size))
		require.NoError(t, err)
	}
	require.NoError(t, w.Flush())
	require.NoError(t, f.Close())
}
