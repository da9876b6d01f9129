package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
)

func newVersionCommand() *cobra.Command {
	var ef engineFlags
	var asJSON bool
	cmd := newCommand("version",
		"print versions of stepwise, the engine ABI, libtorch and the devices",
		cobra.NoArgs, func(cmd *cobra.Command, _ []string) error {
			return runVersion(&ef, asJSON, cmd.OutOrStdout(), cmd.ErrOrStderr())
		})
	ef.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func runVersion(ef *engineFlags, asJSON bool, stdout, stderr io.Writer) error {
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	v := lib.Version()
	devices, err := lib.Devices()
	if err != nil {
		return err
	}
	if asJSON {
		return json.NewEncoder(stdout).Encode(map[string]any{
			"stepwise": version, "engine": v.Stepwise, "abi": v.ABI, "abi_expected": binding.ABIVersion,
			"torch": v.Torch, "build": v.Build, "library": lib.Path(), "devices": devices, "device": lib.Device().ID,
			"backends": v.Backends,
		})
	}
	fmt.Fprintf(stdout, "stepwise %s\n", version)
	fmt.Fprintf(stdout, "engine   %s (ABI %d) at %s\n", v.Stepwise, v.ABI, lib.Path())
	fmt.Fprintf(stdout, "libtorch %s\n", v.Torch)
	fmt.Fprintf(stdout, "build    %s\n", v.Build)
	fmt.Fprintln(stdout, "backends:")
	for _, b := range v.Backends {
		state := "available"
		switch {
		case !b.Available:
			state = "unavailable: " + b.Reason
		case b.Library != "":
			state += " (" + b.Library + ")"
		}
		fmt.Fprintf(stdout, "   %-8s %s\n", b.Backend, state)
	}
	fmt.Fprintln(stdout, "devices:")
	for _, d := range devices {
		mark := " "
		if d.ID == lib.Device().ID {
			mark = "*"
		}
		fmt.Fprintf(stdout, " %s %-7s %s (memory %s, free %s)\n", mark, d.ID, d.Name, formatBytes(d.TotalMemory), formatBytes(d.FreeMemory))
	}
	return nil
}
