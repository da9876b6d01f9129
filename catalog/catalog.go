// Package catalog knows the checkpoints in a models folder as a user keeps
// them: diffusers folders, single-file .safetensors and .ckpt checkpoints and
// standalone VAEs, each with a name to choose it by, its architecture read
// from its tensors, and AUTOMATIC1111's hashes, computed once and cached by
// size and modification time.
package catalog

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/stepwise-sd/stepwise/internal/atomicfile"
	"github.com/stepwise-sd/stepwise/internal/regfile"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
)

// Kinds of entry.
const (
	KindCheckpoint = "checkpoint" // a Stable Diffusion model: diffusers folder or single file
	KindVAE        = "vae"        // a standalone VAE
	KindSeg        = "seg"        // a segmentation U-Net (Pytorch-UNet layout)
)

// Entry is one model of the folder.
type Entry struct {
	// Name is the path below the models folder without its extension, with
	// forward slashes: what a request names the model by (A1111's model_name).
	Name string `json:"name"`
	// Title is A1111's "name.ext [shorthash]".
	Title    string `json:"title"`
	Path     string `json:"filename"`
	Format   string `json:"format"` // "diffusers", "safetensors", "ckpt"
	Kind     string `json:"kind"`
	Arch     string `json:"arch"` // "sd1", "sd2", "sdxl", "unknown"
	Inpaint  bool   `json:"inpainting"`
	VPred    bool   `json:"v_prediction"`
	Bytes    int64  `json:"bytes"`
	SHA256   string `json:"sha256"`
	Hash     string `json:"hash"` // the 10-hex short hash A1111 shows
	Problems string `json:"problem,omitempty"`
}

// ErrUnknownModel is returned for a name that is in no entry.
var ErrUnknownModel = errors.New("unknown model")

// Catalog lists a models folder. It is safe for concurrent use.
type Catalog struct {
	dir       string
	cachePath string

	mu      sync.RWMutex
	entries []Entry
	hashes  map[string]hashRecord // by absolute file path
}

// hashRecord is a cached file hash, valid while size and mtime are unchanged.
type hashRecord struct {
	Size    int64  `json:"size"`
	ModTime int64  `json:"mtime_ns"`
	SHA256  string `json:"sha256"`
}

// Open scans dir; hashes are cached in cacheDir (created if needed) across runs.
func Open(dir, cacheDir string) (*Catalog, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if st, err := os.Stat(abs); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("models folder %s: not a folder", dir)
	}
	c := &Catalog{dir: abs, hashes: map[string]hashRecord{}}
	if cacheDir != "" {
		if err := os.MkdirAll(cacheDir, 0o755); err != nil {
			return nil, err
		}
		c.cachePath = filepath.Join(cacheDir, "model-hashes.json")
		if b, err := os.ReadFile(c.cachePath); err == nil {
			_ = json.Unmarshal(b, &c.hashes) // a broken cache is rebuilt
		}
	}
	return c, c.Refresh()
}

// Dir is the models folder.
func (c *Catalog) Dir() string { return c.dir }

// Refresh rescans the folder; files that changed are hashed again.
func (c *Catalog) Refresh() error {
	var found []Entry
	err := filepath.WalkDir(c.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // an unreadable subfolder is skipped, not fatal
		}
		if d.IsDir() {
			if p != c.dir && strings.HasPrefix(d.Name(), ".") {
				return filepath.SkipDir
			}
			if fileExists(filepath.Join(p, "model_index.json")) && p != c.dir {
				found = append(found, c.describeFolder(p))
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil // links and special files are not models
		}
		switch strings.ToLower(filepath.Ext(p)) {
		case ".safetensors", ".ckpt":
			found = append(found, c.describeFile(p))
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Slice(found, func(i, j int) bool { return found[i].Name < found[j].Name })
	c.mu.Lock()
	c.entries = found
	c.mu.Unlock()
	return c.saveHashes()
}

// List returns every entry of kind ("" for all), by name.
func (c *Catalog) List(kind string) []Entry {
	c.mu.RLock()
	defer c.mu.RUnlock()
	var out []Entry
	for _, e := range c.entries {
		if kind == "" || e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

// Find looks an entry of kind up by its name, title, file name (with or
// without extension), full path, short hash or sha256, as A1111 clients name
// checkpoints. The error for an unknown name lists the choices.
func (c *Catalog) Find(kind, name string) (Entry, error) {
	name = strings.TrimSpace(name)
	entries := c.List(kind)
	for _, e := range entries {
		base := filepath.Base(e.Path)
		if name == e.Name || name == e.Title || name == e.Path || name == base ||
			name == strings.TrimSuffix(base, filepath.Ext(base)) || name == e.Name+filepath.Ext(e.Path) ||
			(e.Hash != "" && (name == e.Hash || name == e.SHA256)) {
			return e, nil
		}
	}
	choices := make([]string, 0, len(entries))
	for _, e := range entries {
		choices = append(choices, e.Name)
	}
	return Entry{}, fmt.Errorf("%w %q: the models folder has %s", ErrUnknownModel, name, describeChoices(choices))
}

func describeChoices(names []string) string {
	if len(names) == 0 {
		return "none of that kind"
	}
	return strings.Join(names, ", ")
}

func (c *Catalog) name(p string) string {
	rel, err := filepath.Rel(c.dir, p)
	if err != nil {
		rel = filepath.Base(p)
	}
	return filepath.ToSlash(strings.TrimSuffix(rel, filepath.Ext(rel)))
}

func (c *Catalog) describeFile(p string) Entry {
	e := Entry{Name: c.name(p), Path: p, Kind: KindCheckpoint, Arch: "unknown"}
	e.Format = strings.TrimPrefix(strings.ToLower(filepath.Ext(p)), ".")
	if st, err := os.Stat(p); err == nil {
		e.Bytes = st.Size()
	}
	sum, err := c.fileHash(p)
	if err != nil {
		e.Problems = err.Error()
	}
	e.SHA256 = sum
	if e.Format == "safetensors" {
		names, shapes, err := readHeader(p)
		if err != nil {
			e.Problems = err.Error()
		} else {
			describeTensors(&e, names, shapes)
		}
	}
	// An LDM yaml beside the file says v-prediction (parameterization: "v").
	if y, err := regfile.ReadFile(strings.TrimSuffix(p, filepath.Ext(p))+".yaml", maxConfigBytes); err == nil {
		e.VPred = strings.Contains(string(y), `parameterization: "v"`) || strings.Contains(string(y), "parameterization: v")
	}
	finish(&e)
	return e
}

func (c *Catalog) describeFolder(p string) Entry {
	e := Entry{Name: c.name(p), Path: p, Format: "diffusers", Kind: KindCheckpoint, Arch: "unknown"}
	// The folder's hash: sha256 over its weight files' hashes in path order.
	h := sha256.New()
	_ = filepath.WalkDir(p, func(f string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !d.Type().IsRegular() || filepath.Ext(f) != ".safetensors" {
			return nil
		}
		if st, err := d.Info(); err == nil {
			e.Bytes += st.Size()
		}
		sum, err := c.fileHash(f)
		if err != nil {
			e.Problems = err.Error()
			return nil
		}
		rel, _ := filepath.Rel(p, f)
		fmt.Fprintf(h, "%s %s\n", filepath.ToSlash(rel), sum)
		return nil
	})
	e.SHA256 = hex.EncodeToString(h.Sum(nil))
	var te struct {
		Hidden int `json:"hidden_size"`
	}
	if readJSON(filepath.Join(p, "text_encoder", "config.json"), &te) == nil {
		switch te.Hidden {
		case 768:
			e.Arch = "sd1"
		case 1024:
			e.Arch = "sd2"
		default:
			e.Arch = fmt.Sprintf("sd1 (text width %d)", te.Hidden)
		}
	}
	var unet struct {
		In int `json:"in_channels"`
	}
	if readJSON(filepath.Join(p, "unet", "config.json"), &unet) == nil {
		e.Inpaint = unet.In == 9
	}
	var sched struct {
		Prediction string `json:"prediction_type"`
	}
	if readJSON(filepath.Join(p, "scheduler", "scheduler_config.json"), &sched) == nil {
		e.VPred = sched.Prediction == "v_prediction"
	}
	finish(&e)
	return e
}

func finish(e *Entry) {
	if len(e.SHA256) >= 10 {
		e.Hash = e.SHA256[:10]
	}
	ext := filepath.Ext(e.Path)
	e.Title = strings.TrimSpace(e.Name + ext + " [" + e.Hash + "]")
}

// describeTensors reads architecture from a single file's tensor names and shapes.
func describeTensors(e *Entry, names []string, shapes map[string][]int64) {
	has := func(prefix string) bool {
		for _, n := range names {
			if strings.HasPrefix(n, prefix) {
				return true
			}
		}
		return false
	}
	switch {
	case has("conditioner.embedders."):
		e.Arch = "sdxl"
	case has("cond_stage_model.model.transformer."):
		e.Arch = "sd2"
	case has("cond_stage_model.transformer."):
		e.Arch = "sd1"
	case !has("model.diffusion_model.") && (has("decoder.") || has("first_stage_model.decoder.")):
		e.Kind, e.Arch = KindVAE, "vae"
	case has("inc.double_conv.") && has("outc.conv."):
		e.Kind, e.Arch = KindSeg, "unet-seg"
	}
	if s, ok := shapes["model.diffusion_model.input_blocks.0.0.weight"]; ok && len(s) == 4 {
		e.Inpaint = s[1] == 9
	}
}

func readHeader(p string) ([]string, map[string][]int64, error) {
	shapes, err := safetensors.ReadShapes(p)
	if err != nil {
		return nil, nil, err
	}
	names := make([]string, 0, len(shapes))
	for name := range shapes {
		names = append(names, name)
	}
	sort.Strings(names)
	return names, shapes, nil
}

// fileHash is the file's sha256, from the cache while its size and mtime hold.
func (c *Catalog) fileHash(p string) (string, error) {
	st, err := os.Stat(p)
	if err != nil {
		return "", err
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("%s: not a regular file", p)
	}
	c.mu.RLock()
	rec, ok := c.hashes[p]
	c.mu.RUnlock()
	if ok && rec.Size == st.Size() && rec.ModTime == st.ModTime().UnixNano() {
		return rec.SHA256, nil
	}
	f, _, err := regfile.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", p, err)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	c.mu.Lock()
	c.hashes[p] = hashRecord{Size: st.Size(), ModTime: st.ModTime().UnixNano(), SHA256: sum}
	c.mu.Unlock()
	return sum, nil
}

func (c *Catalog) saveHashes() error {
	if c.cachePath == "" {
		return nil
	}
	c.mu.RLock()
	b, err := json.MarshalIndent(c.hashes, "", " ")
	c.mu.RUnlock()
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(c.cachePath, b, 0o644)
}

// maxConfigBytes bounds a model config read to describe a folder.
const maxConfigBytes = 1 << 20

func readJSON(p string, v any) error {
	b, err := regfile.ReadFile(p, maxConfigBytes)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// Describe makes the entry of one model outside any models folder (a
// server's --model): its name is its file or folder name.
func Describe(path string) (Entry, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return Entry{}, err
	}
	st, err := os.Stat(abs)
	if err != nil {
		return Entry{}, err
	}
	c := &Catalog{dir: filepath.Dir(abs), hashes: map[string]hashRecord{}}
	if st.IsDir() {
		return c.describeFolder(abs), nil
	}
	return c.describeFile(abs), nil
}
