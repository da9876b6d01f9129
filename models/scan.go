package models

import (
	"encoding/binary"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/stepwise-sd/stepwise/internal/regfile"
)

// maxIndexBytes bounds a model_index.json read while scanning: a real one is
// under a kilobyte.
const maxIndexBytes = 1 << 20

// Found is a model found on disk.
type Found struct {
	Kind  string `json:"kind"` // "sd" (diffusers folder), "sd-checkpoint" (single file), "seg"
	Path  string `json:"path"`
	Bytes int64  `json:"bytes"` // size of its weight files
	Class string `json:"class,omitempty"`
}

// Scan lists the models directly inside dir: diffusers folders (with
// model_index.json), single-file checkpoints and segmentation U-Nets.
// Symlinks are followed; FIFOs, devices and sockets are skipped unopened.
func Scan(dir string) ([]Found, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []Found
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		info, err := os.Stat(p)
		if err != nil {
			continue
		}
		if info.IsDir() {
			if f, ok := diffusersFolder(p); ok {
				out = append(out, f)
			}
			continue
		}
		if !info.Mode().IsRegular() {
			continue
		}
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".safetensors", ".ckpt", ".pth":
			kind := "sd-checkpoint"
			if looksLikeSeg(p) {
				kind = "seg"
			}
			out = append(out, Found{Kind: kind, Path: p, Bytes: info.Size()})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}

func diffusersFolder(dir string) (Found, bool) {
	b, err := regfile.ReadFile(filepath.Join(dir, "model_index.json"), maxIndexBytes)
	if err != nil {
		return Found{}, false
	}
	var idx struct {
		Class string `json:"_class_name"`
	}
	_ = json.Unmarshal(b, &idx)
	var size int64
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && filepath.Ext(p) == ".safetensors" {
			if fi, err := d.Info(); err == nil {
				size += fi.Size()
			}
		}
		return nil
	})
	return Found{Kind: "sd", Path: dir, Bytes: size, Class: idx.Class}, true
}

// looksLikeSeg reports whether a weights file is in the Pytorch-UNet layout,
// judged by the tensor names in a safetensors header or the file name.
func looksLikeSeg(path string) bool {
	if strings.EqualFold(filepath.Ext(path), ".pth") {
		return true
	}
	f, _, err := regfile.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var n [8]byte
	if _, err := io.ReadFull(f, n[:]); err != nil {
		return false
	}
	size := min(binary.LittleEndian.Uint64(n[:]), 1<<20) // the names we look for come early enough
	head := make([]byte, size)
	m, _ := io.ReadFull(f, head)
	s := string(head[:m])
	return strings.Contains(s, `"inc.double_conv.0.weight"`) || strings.Contains(s, `"outc.conv.weight"`)
}
