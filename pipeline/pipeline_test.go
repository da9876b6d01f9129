package pipeline_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"hash/crc32"
	"image"
	"image/draw"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/models"
	"github.com/stepwise-sd/stepwise/pipeline"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func newEngine(t *testing.T) (*pipeline.Runner, string) {
	t.Helper()
	lib := testenv.Library(t)
	dir := t.TempDir()
	runs, err := pipeline.OpenRuns(filepath.Join(dir, "runs"), pipeline.RunsOptions{})
	require.NoError(t, err)
	c := modelcache.New(modelcache.LibraryLoader{Lib: lib}, modelcache.Options{Budget: -1})
	t.Cleanup(c.Close)
	return &pipeline.Runner{Cache: c, Runs: runs, ConvertDir: filepath.Join(dir, "convert"), Version: "test"}, runs.Dir()
}

func photo(t *testing.T, w, h int) []byte { return testenv.Photo(t, w, h) }

func decodePNG(t *testing.T, path string) image.Image { return testenv.ReadPNG(t, path) }

func nrgba(img image.Image) *image.NRGBA {
	out := image.NewNRGBA(img.Bounds())
	draw.Draw(out, out.Rect, img, img.Bounds().Min, draw.Src)
	return out
}

func editOptions(sd, seg string) pipeline.EditOptions {
	o := pipeline.DefaultEditOptions()
	o.SD, o.Segment.Model, o.Segment.Scale = pipeline.ModelRef{Path: sd}, pipeline.ModelRef{Path: seg}, 1
	o.Prompt, o.Steps, o.Seed, o.WorkingSize, o.MaskBlur = "a forest in autumn", 3, 11, 64, 2
	return o
}

func TestEditWritesEveryFileAndKeepsTheSubject(t *testing.T) {
	sdDir, segPath := testenv.Tiny(t)
	e, runsDir := newEngine(t)
	input := photo(t, 96, 80)
	res, err := e.Edit(context.Background(), input, editOptions(sdDir, segPath))
	require.NoError(t, err)
	for _, f := range []string{"input.png", "mask.png", "edited.png", "edited_mask.png", "params.json"} {
		assert.FileExists(t, filepath.Join(res.Dir, f))
	}
	assert.Equal(t, filepath.Join(runsDir, res.RunID), res.Dir)
	in := nrgba(decodePNG(t, filepath.Join(res.Dir, "input.png")))
	out := nrgba(decodePNG(t, filepath.Join(res.Dir, "edited.png")))
	mask := decodePNG(t, filepath.Join(res.Dir, "mask.png")).(*image.Gray)
	kept, changed := 0, 0
	for i, m := range mask.Pix {
		if m == 255 { // subject: kept exactly
			kept++
			require.Equal(t, in.Pix[4*i:4*i+4], out.Pix[4*i:4*i+4], "subject pixel %d changed", i)
		} else if !bytes.Equal(in.Pix[4*i:4*i+3], out.Pix[4*i:4*i+3]) {
			changed++
		}
	}
	assert.Greater(t, kept, 0)
	assert.Greater(t, changed, 0, "the background was repainted")
	// The IoU reported is that of the two masks written.
	written, err := pipeline.IoU(pipeline.MaskFromImage(mask, 128),
		pipeline.MaskFromImage(decodePNG(t, filepath.Join(res.Dir, "edited_mask.png")), 128))
	require.NoError(t, err)
	assert.InDelta(t, written, res.IoU, 1e-12)
	assert.Less(t, res.IoU, 1.0, "the repainted background moved the subject's border")
	assert.Greater(t, res.IoU, 0.5, "the kept subject is found again")

	var params map[string]any
	b, err := os.ReadFile(filepath.Join(res.Dir, "params.json"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &params))
	assert.EqualValues(t, 11, params["seed"])
	assert.Equal(t, "euler_a", params["sampler"])
	assert.InDelta(t, res.IoU, params["subject_iou"].(float64), 1e-12)
	assert.Equal(t, []any{96.0, 80.0}, params["input_size"])
	assert.Equal(t, []any{64.0, 56.0}, params["working_size"])
	assert.Contains(t, params["sd_model"].(map[string]any)["arch"], "sd1")

	// The same seed gives the same edited.png.
	again, err := e.Edit(context.Background(), input, editOptions(sdDir, segPath))
	require.NoError(t, err)
	a, _ := os.ReadFile(filepath.Join(res.Dir, "edited.png"))
	c, _ := os.ReadFile(filepath.Join(again.Dir, "edited.png"))
	assert.Equal(t, a, c)
	assert.NotEqual(t, res.RunID, again.RunID)
}

func TestGenerateEntryPoints(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	e, _ := newEngine(t)
	ctx := context.Background()
	base := pipeline.DefaultGenerateOptions()
	base.SD, base.Prompt, base.Steps, base.Seed, base.Width, base.Height = pipeline.ModelRef{Path: sdDir}, "a cat", 2, 1, 64, 64
	r, err := e.Txt2Img(ctx, base)
	require.NoError(t, err)
	assert.Equal(t, []string{"image-0.png"}, r.Files)
	assert.Equal(t, "txt2img", r.Params.Kind)

	o := base
	o.Init = photo(t, 72, 64)
	o.Width, o.Height = 0, 0
	r, err = e.Img2Img(ctx, o)
	require.NoError(t, err)
	assert.Equal(t, "img2img", r.Params.Kind)
	assert.Equal(t, 72, r.Params.Width)
	assert.InDelta(t, 0.75, r.Params.Strength, 1e-6)
	assert.FileExists(t, filepath.Join(r.Dir, "input.png"))

	var mask bytes.Buffer
	m := image.NewGray(image.Rect(0, 0, 72, 64))
	for i := range m.Pix[:len(m.Pix)/2] {
		m.Pix[i] = 255
	}
	require.NoError(t, png.Encode(&mask, m))
	o.Mask = mask.Bytes()
	o.MaskBlur = 1
	r, err = e.Inpaint(ctx, o)
	require.NoError(t, err)
	assert.Equal(t, "inpaint", r.Params.Kind)
	assert.InDelta(t, 1, r.Params.Strength, 1e-6)
	assert.Equal(t, 1.0, r.Params.MaskBlur)
	assert.FileExists(t, filepath.Join(r.Dir, "mask.png"))

	// Render takes the same path and writes no run folder.
	o.Seed = 9
	rendered, err := e.Render(ctx, o)
	require.NoError(t, err)
	again, err := e.Inpaint(ctx, o)
	require.NoError(t, err)
	assert.Equal(t, nrgba(again.Images[0]).Pix, nrgba(rendered.Images[0]).Pix, "Render draws what Generate draws")
	assert.Equal(t, []int{1, 4, 8, 9}, rendered.Latents.Shape)
	assert.Equal(t, again.Params.Width, rendered.Params.Width)

	// The mask is feathered before inpainting: a wide blur fades a small
	// square below the engine's threshold, so that square is not repainted.
	m = image.NewGray(image.Rect(0, 0, 72, 64))
	for y := 40; y < 48; y++ {
		for x := 16; x < 24; x++ {
			m.Pix[y*72+x] = 255
		}
	}
	mask.Reset()
	require.NoError(t, png.Encode(&mask, m))
	o.Mask = mask.Bytes()
	o.MaskBlur = 0
	sharp, err := e.Render(ctx, o)
	require.NoError(t, err)
	o.MaskBlur = 12
	soft, err := e.Render(ctx, o)
	require.NoError(t, err)
	assert.False(t, bytes.Equal(nrgba(sharp.Images[0]).Pix, nrgba(soft.Images[0]).Pix), "mask blur changes the inpainting")
}

func TestResolveModelConvertsPickleCheckpointsOnce(t *testing.T) {
	fx := testenv.Fixtures(t)
	e, _ := newEngine(t)
	pth := filepath.Join(fx, "seg/seg-unet-w8/model.pth")
	k1, err := e.ResolveModel(modelcache.KindSeg, pipeline.ModelRef{Path: pth})
	require.NoError(t, err)
	assert.Equal(t, ".safetensors", filepath.Ext(k1.Path))
	assert.True(t, strings.HasPrefix(k1.Path, e.ConvertDir+string(filepath.Separator)), k1.Path)
	st1, err := os.Stat(k1.Path)
	require.NoError(t, err)
	k2, err := e.ResolveModel(modelcache.KindSeg, pipeline.ModelRef{Path: pth})
	require.NoError(t, err)
	assert.Equal(t, k1, k2)
	st2, err := os.Stat(k2.Path)
	require.NoError(t, err)
	assert.Equal(t, st1.ModTime(), st2.ModTime(), "converted once")
	// A safetensors file is its own path.
	st := filepath.Join(fx, "seg/seg-unet-w8/model.safetensors")
	k3, err := e.ResolveModel(modelcache.KindSeg, pipeline.ModelRef{Path: st})
	require.NoError(t, err)
	assert.Equal(t, st, k3.Path)
}

// bombPNG is a valid PNG signature and IHDR claiming w x h pixels, and nothing else.
func bombPNG(w, h uint32) []byte {
	var b bytes.Buffer
	b.Write([]byte("\x89PNG\r\n\x1a\n"))
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr[0:], w)
	binary.BigEndian.PutUint32(ihdr[4:], h)
	ihdr[8], ihdr[9] = 8, 2 // 8-bit RGB
	chunk := append([]byte("IHDR"), ihdr...)
	binary.Write(&b, binary.BigEndian, uint32(13))
	b.Write(chunk)
	binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(chunk))
	return b.Bytes()
}

func TestBadInputsLeaveNoRunBehind(t *testing.T) {
	sdDir, segPath := testenv.Tiny(t)
	e, runsDir := newEngine(t)
	good := photo(t, 96, 80)
	tests := []struct {
		name  string
		input []byte
		want  string
	}{
		{"truncated", good[:len(good)/2], "bad image"},
		{"corrupt", append(append([]byte{}, good[:100]...), bytes.Repeat([]byte{0xAB}, 500)...), "bad image"},
		{"not an image", []byte("hello, this is text"), "not a PNG or JPEG"},
		{"decompression bomb", bombPNG(60000, 60000), "more than the"},
		{"too small", photo(t, 12, 12), "needs at least 16x16"},
		{"empty", nil, "bad image"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.Edit(context.Background(), tt.input, editOptions(sdDir, segPath))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			ents, _ := os.ReadDir(runsDir)
			assert.Empty(t, ents, "no partial run directory")
		})
	}
	// Inpaint with a mask of the wrong size.
	o := pipeline.GenerateOptions{SD: pipeline.ModelRef{Path: sdDir}, Prompt: "x", Steps: 1, Init: good, Mask: photo(t, 40, 40)}
	_, err := e.Inpaint(context.Background(), o)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the mask is 40x40, the init image 96x80")
	// A generation cancelled midway leaves nothing either.
	ctx, cancel := context.WithCancel(context.Background())
	o = pipeline.GenerateOptions{SD: pipeline.ModelRef{Path: sdDir}, Prompt: "x", Steps: 5, Width: 64, Height: 64,
		OnStep: func(s binding.Step) { cancel() }}
	_, err = e.Txt2Img(ctx, o)
	assert.ErrorIs(t, err, binding.ErrCancelled)
	ents, _ := os.ReadDir(runsDir)
	assert.Empty(t, ents)
}

func TestSegmentationMatchesReferenceForPthAndSafetensors(t *testing.T) {
	fx := testenv.Fixtures(t)
	lib := testenv.Library(t)
	for _, name := range []string{"seg-unet-w8", "seg-unet-w8-bilinear"} {
		dir := filepath.Join(fx, "seg", name)
		g, err := safetensors.Read(filepath.Join(dir, "golden.safetensors"))
		require.NoError(t, err)
		var results [2][]*binding.SegmentResult
		for k, file := range []string{"model.safetensors", "model.pth"} {
			path, err := models.Resolve(filepath.Join(dir, file), t.TempDir())
			require.NoError(t, err)
			m, err := lib.OpenSeg(binding.SegOptions{Path: path})
			require.NoError(t, err, file)
			for i := 0; ; i++ {
				prefix := "case" + string(rune('0'+i)) + "."
				in, ok := g.Tensors[prefix+"input"]
				if !ok {
					break
				}
				full := g.Tensors[prefix+"logits_full"]
				vals, _ := in.Float32s()
				h, w := int(in.Shape[2]), int(in.Shape[3])
				img := &binding.Image{Width: w, Height: h, Channels: 3, Pix: make([]byte, w*h*3)}
				for c := 0; c < 3; c++ {
					for p := 0; p < w*h; p++ {
						img.Pix[3*p+c] = byte(math.Round(float64(vals[c*w*h+p]) * 255))
					}
				}
				res, err := m.Segment(context.Background(), binding.SegmentRequest{Image: img, OutWidth: int(full.Shape[3]), OutHeight: int(full.Shape[2]), Logits: true})
				require.NoError(t, err)
				want, _ := full.Float32s()
				var d float64
				for j := range want {
					d = math.Max(d, math.Abs(float64(want[j]-res.Logits.Data[j])))
				}
				assert.LessOrEqual(t, d, 1e-3, "%s %s case %d logits", name, file, i)
				labels, _ := g.Tensors[prefix+"mask"].Int64s()
				agree := 0
				for j, l := range labels {
					if int64(res.Labels.Pix[j]) == l {
						agree++
					}
				}
				assert.GreaterOrEqual(t, float64(agree)/float64(len(labels)), 0.999, "%s %s case %d mask", name, file, i)
				results[k] = append(results[k], res)
			}
			m.Close()
		}
		require.Len(t, results[1], len(results[0]))
		for i := range results[0] {
			assert.Equal(t, results[0][i].Logits.Data, results[1][i].Logits.Data, ".pth and .safetensors give identical outputs")
		}
	}
}

func TestCleanupRemovesOldRunsOnly(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	dir := t.TempDir()
	runs, err := pipeline.OpenRuns(dir, pipeline.RunsOptions{Retention: 24 * time.Hour, Now: clock})
	require.NoError(t, err)

	old, err := runs.Begin()
	require.NoError(t, err)
	require.NoError(t, old.WriteFile("a.txt", []byte("old")))
	oldDir, err := old.Commit()
	require.NoError(t, err)

	running, err := runs.Begin() // started long ago, still in progress
	require.NoError(t, err)
	require.NoError(t, running.WriteFile("a.txt", []byte("busy")))

	now = now.Add(20 * time.Hour)
	young, err := runs.Begin()
	require.NoError(t, err)
	youngDir, err := young.Commit()
	require.NoError(t, err)

	now = now.Add(5 * time.Hour) // old and running are 25 h old, young 5 h
	removed, err := runs.Cleanup()
	require.NoError(t, err)
	assert.Equal(t, []string{old.ID}, removed)
	assert.NoDirExists(t, oldDir)
	assert.DirExists(t, youngDir)
	// The running job is untouched and can still finish.
	require.NoError(t, running.WriteFile("b.txt", []byte("done")))
	runningDir, err := running.Commit()
	require.NoError(t, err)
	assert.FileExists(t, filepath.Join(runningDir, "a.txt"))

	// A staging folder left by a dead process is removed once old.
	stale := filepath.Join(dir, ".tmp-20200101T000000Z-deadbeef")
	require.NoError(t, os.MkdirAll(stale, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(stale, ".owner"), []byte("999999999"), 0o644))
	// Folders that are not runs are never touched.
	other := filepath.Join(dir, "notes")
	require.NoError(t, os.MkdirAll(other, 0o755))
	now = now.Add(48 * time.Hour)
	removed, err = runs.Cleanup()
	require.NoError(t, err)
	assert.Contains(t, removed, "20200101T000000Z-deadbeef")
	assert.NoDirExists(t, stale)
	assert.DirExists(t, other)

	_, err = runs.Path("../etc", "passwd")
	assert.Error(t, err)
	_, err = runs.Path(young.ID, "../../x")
	assert.Error(t, err)
	p, err := runs.Path(young.ID, "edited.png")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(youngDir, "edited.png"), p)
}

func TestMaskOperations(t *testing.T) {
	m := pipeline.NewMask(9, 9)
	m.Pix[4*9+4] = 255
	m.Grow(1)
	assert.InDelta(t, 9.0/81, m.Covers(), 1e-9)
	m.Grow(-1)
	assert.InDelta(t, 1.0/81, m.Covers(), 1e-9)
	m.Invert()
	assert.InDelta(t, 80.0/81, m.Covers(), 1e-9)
	a, b := pipeline.NewMask(4, 4), pipeline.NewMask(4, 4)
	a.Pix[0], a.Pix[1], b.Pix[1], b.Pix[2] = 255, 255, 255, 255
	iou, err := pipeline.IoU(a, b)
	require.NoError(t, err)
	assert.InDelta(t, 1.0/3, iou, 1e-9)
	_, err = pipeline.IoU(a, pipeline.NewMask(2, 2))
	assert.Error(t, err)
	w, h := pipeline.WorkingSize(1920, 1080, 512)
	assert.Equal(t, 512, w)
	assert.Equal(t, 288, h)
}
