package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/models"
)

func newModelsCommand() *cobra.Command {
	cmd := newCommand("models",
		"list models, make the tiny demo models, convert pickle checkpoints",
		cobra.NoArgs, needsSubcommand)
	cmd.AddCommand(newModelsLsCommand(), newModelsMakeTinyCommand(), newModelsConvertCommand())
	return cmd
}

func newModelsConvertCommand() *cobra.Command {
	return newCommand("convert FILE.pth|.ckpt [OUT.safetensors]",
		"convert a pickle checkpoint to safetensors (default: beside it)",
		cobra.RangeArgs(1, 2), func(cmd *cobra.Command, args []string) error {
			src := args[0]
			dst := strings.TrimSuffix(src, filepath.Ext(src)) + ".safetensors"
			if len(args) == 2 {
				dst = args[1]
			}
			if err := models.ConvertPickle(src, dst); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s\n", dst)
			return nil
		})
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

func newModelsLsCommand() *cobra.Command {
	var asJSON bool
	cmd := newCommand("ls [DIR]",
		"list the models in DIR (default: $STEPWISE_MODELS, else ~/.local/share/stepwise/models)",
		cobra.MaximumNArgs(1), func(cmd *cobra.Command, args []string) error {
			return runModelsLs(args, asJSON, cmd.OutOrStdout())
		})
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func runModelsLs(args []string, asJSON bool, stdout io.Writer) error {
	dir := defaultModelsDir()
	if len(args) > 0 {
		dir = args[0]
	}
	found, err := models.Scan(dir)
	if err != nil {
		return fmt.Errorf("list models in %s: %w", dir, err)
	}
	if asJSON {
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

func newModelsMakeTinyCommand() *cobra.Command {
	var ef engineFlags
	cmd := newCommand("make-tiny DIR",
		"write the deterministic tiny SD model and segmentation U-Net to DIR",
		cobra.ExactArgs(1), func(cmd *cobra.Command, args []string) error {
			return runModelsMakeTiny(&ef, args[0], cmd.OutOrStdout(), cmd.ErrOrStderr())
		})
	ef.register(cmd)
	return cmd
}

func runModelsMakeTiny(ef *engineFlags, dir string, stdout, stderr io.Writer) error {
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	sd, seg, err := models.MakeTiny(lib, dir)
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
