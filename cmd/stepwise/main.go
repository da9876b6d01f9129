// Command stepwise serves, generates, segments, edits and benchmarks with the
// native Stable Diffusion engine. Each command lives in its own file.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// Exit statuses.
const (
	exitOK    = 0
	exitError = 1 // the command ran and failed
	exitUsage = 2 // the command was called wrongly: bad flags, arguments or command
)

// run executes the command line args and returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	root := newRootCommand(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteC()
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(stderr, "%s: %v\n", cmd.CommandPath(), err)
	if errors.As(err, new(usageError)) {
		fmt.Fprintf(stderr, "\n%s", cmd.UsageString())
		return exitUsage
	}
	return exitError
}

// usageError is a mistake in how a command was called: its message is
// followed by the command's usage.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// usageArgs makes the errors of a cobra argument check usage errors.
func usageArgs(check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := check(cmd, args); err != nil {
			return usageError{err}
		}
		return nil
	}
}

// newCommand is a command: its usage line, summary, argument check (whose
// errors are usage errors) and action.
func newCommand(use, short string, args cobra.PositionalArgs, run func(*cobra.Command, []string) error) *cobra.Command {
	return &cobra.Command{Use: use, Short: short, Args: usageArgs(args), RunE: run}
}

// flagged is a command's own flags: it registers them and runs with them.
type flagged interface {
	register(cmd *cobra.Command)
	run(cmd *cobra.Command, args []string) error
}

// newFlaggedCommand is newCommand for a command whose flags f holds.
func newFlaggedCommand(use, short string, args cobra.PositionalArgs, f flagged) *cobra.Command {
	cmd := newCommand(use, short, args, f.run)
	f.register(cmd)
	return cmd
}

// needsSubcommand is the action of a command that only groups others.
func needsSubcommand(cmd *cobra.Command, _ []string) error {
	return usageError{errors.New("a command is needed")}
}

func newRootCommand(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "stepwise",
		Short: "Stable Diffusion on a native libtorch engine: serve, generate, segment, edit, bench",
		// A word that is no command reaches Args, not cobra's own check, so
		// that it is a usage error like every other.
		Args:          usageArgs(cobra.NoArgs),
		RunE:          needsSubcommand,
		SilenceErrors: true, // run prints them, once, with the command's path
		SilenceUsage:  true, // and the usage only for usage errors
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			// cobra's own check, run here so a missing flag is a usage error.
			if err := cmd.ValidateRequiredFlags(); err != nil {
				return usageError{err}
			}
			return nil
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(newServeCommand(), newWorkerCommand(), newGenerateCommand(), newSegmentCommand(), newEditCommand(),
		newBenchCommand(), newModelsCommand(), newVersionCommand())
	return root
}
