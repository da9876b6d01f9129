package models

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Found is a model found on disk.
type Found struct {
	Kind  string `json:"kind"` // "sd" (diffusers folder), "sd-checkpoint" (single file), "seg"
	Path  string `json:"path"`
	Bytes int64  `json:"bytes"` // size of its weight files
	Class string `json:"class,omitempty"`
}

// Scan lists the models directly inside dir: diffusers folders (with
// model_index.json), single-file checkpoints and segmentation U-Nets.
func Scan(dir string) ([]Found, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []Found
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if e.IsDir() {
			if f, ok := diffusersFolder(p); ok {
				out = append(out, f)
			}
			continue
		}
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".safetensors", ".ckpt", ".pth":
			info, err := e.Info()
			if err != nil {
				continue
			}
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
	b, err := os.ReadFile(filepath.Join(dir, "model_index.json"))
	if err != nil {
		return Found{}, false
	}
	var idx struct {
		Class string `json:"_class_name"`
	}
	_ = json.Unmarshal(b, &idx)
	var size int64
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && filepath.Ext(p) == ".safetensors" {
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
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var n [8]byte
	if _, err := f.Read(n[:]); err != nil {
		return false
	}
	size := uint64(0)
	for i := 7; i >= 0; i-- {
		size = size<<8 | uint64(n[i])
	}
	if size > 1<<20 {
		size = 1 << 20 // the names we look for come early enough
	}
	head := make([]byte, size)
	m, _ := f.Read(head)
	s := string(head[:m])
	return strings.Contains(s, `"inc.double_conv.0.weight"`) || strings.Contains(s, `"outc.conv.weight"`)
}
