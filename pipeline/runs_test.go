package pipeline

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// After a kill -9 a run's staging folder stays behind; the next start-up's
// cleanup removes it at once, whatever its age, and leaves live ones alone.
func TestCleanupRemovesStagingOfDeadProcessesAtAnyAge(t *testing.T) {
	dir := t.TempDir()
	runs, err := OpenRuns(dir, RunsOptions{Retention: 24 * time.Hour})
	require.NoError(t, err)
	young := runs.now().UTC().Format(runTimeLayout)
	stage := func(name, owner string) string {
		p := filepath.Join(dir, stagePrefix+young+"-"+name)
		require.NoError(t, os.MkdirAll(p, 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(p, ".owner"), []byte(owner), 0o644))
		return p
	}
	dead := stage("dead", "999999999 12345")
	// Our pid, but written by an earlier process that had it (another start time, or a Runs that is not writing it).
	reused := stage("reused", strconv.Itoa(os.Getpid())+" 1")
	ourPidNotLive := stage("notlive", ownerID(os.Getpid()))
	// The parent process is alive, with its real start time.
	parent := stage("parent", ownerID(os.Getppid()))
	// The parent's pid with another start time: a reused pid.
	parentReused := stage("parentreused", strconv.Itoa(os.Getppid())+" 1")
	live, err := runs.Begin()
	require.NoError(t, err)

	// A second Runs over the same folder (another server in this process) must not take the live run.
	other, err := OpenRuns(dir, RunsOptions{Retention: 24 * time.Hour})
	require.NoError(t, err)
	removed, err := other.Cleanup()
	require.NoError(t, err)
	assert.Len(t, removed, 4, "%v", removed)
	for _, p := range []string{dead, reused, ourPidNotLive, parentReused} {
		assert.NoDirExists(t, p)
	}
	assert.DirExists(t, parent)
	assert.DirExists(t, live.stage)
	_, err = live.Commit()
	require.NoError(t, err)
}
