package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/models"
)

func runModels(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, modelsUsage)
		return errUsage
	}
	switch args[0] {
	case "ls":
		return runModelsLs(args[1:], stdout, stderr)
	case "make-tiny":
		return runModelsMakeTiny(args[1:], stdout, stderr)
	case "convert":
		return runModelsConvert(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "stepwise models: unknown subcommand %q\n%s\n", args[0], modelsUsage)
	return errUsage
}

const modelsUsage = "usage: stepwise models ls [DIR] | make-tiny DIR | convert FILE.pth|.ckpt [OUT.safetensors]"

func runModelsConvert(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("models convert", stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() < 1 || fs.NArg() > 2 {
		fmt.Fprintln(stderr, "usage: stepwise models convert FILE.pth|.ckpt [OUT.safetensors]")
		return errUsage
	}
	src := fs.Arg(0)
	dst := strings.TrimSuffix(src, filepath.Ext(src)) + ".safetensors"
	if fs.NArg() == 2 {
		dst = fs.Arg(1)
	}
	if err := models.ConvertPickle(src, dst); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s\n", dst)
	return nil
}

// defaultModelsDir is $STEPWISE_MODELS, else ~/.local/share/stepwise/models.
func defaultModelsDir() string {
	if d := os.Getenv("STEPWISE_MODELS"); d != "" {
		return d
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "stepwise", "models")
	}
	return "models"
}

func runModelsLs(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("models ls", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	dir := defaultModelsDir()
	if fs.NArg() > 0 {
		dir = fs.Arg(0)
	}
	found, err := models.Scan(dir)
	if err != nil {
		return fmt.Errorf("list models in %s: %w", dir, err)
	}
	if *asJSON {
		if found == nil {
			found = []models.Found{}
		}
		return json.NewEncoder(stdout).Encode(found)
	}
	if len(found) == 0 {
		fmt.Fprintf(stdout, "no models in %s\n", dir)
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tSIZE\tPATH")
	for _, f := range found {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Kind, formatBytes(f.Bytes), f.Path)
	}
	return tw.Flush()
}

func runModelsMakeTiny(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("models make-tiny", stderr)
	var ef engineFlags
	ef.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: stepwise models make-tiny DIR")
		return errUsage
	}
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	sd, seg, err := models.MakeTiny(lib, fs.Arg(0))
	if err != nil {
		return err
	}
	// Prove they load before saying they are there.
	for _, check := range []func() error{
		func() error {
			m, err := lib.OpenSD(binding.SDOptions{Path: sd, Device: "cpu"})
			closeIf(m, err)
			return err
		},
		func() error {
			m, err := lib.OpenSeg(binding.SegOptions{Path: seg, Device: "cpu"})
			closeIf(m, err)
			return err
		},
	} {
		if err := check(); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "tiny Stable Diffusion model: %s\ntiny segmentation model:     %s\n", sd, seg)
	return nil
}

func closeIf(m interface{ Close() error }, err error) {
	if err == nil {
		m.Close()
	}
}
