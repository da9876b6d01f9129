package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/models"
)

// SD15RandomSeed fixes the random-weight SD 1.5 model the sdcpp tests share.
const SD15RandomSeed = 5

// SDCPP is the library for tests of the sdcpp backend; it skips, saying why,
// unless the library was built with the backend and ../shared/sdcpp (the
// prebuilt stable-diffusion.cpp for tests) is there.
func SDCPP(t testing.TB) *binding.Library {
	t.Helper()
	lib := Library(t)
	shared := filepath.Join(Root(), "..", "shared", "sdcpp")
	if _, err := os.Stat(shared); err != nil {
		t.Skipf("no stable-diffusion.cpp build at %s: skipping the sdcpp backend's tests", shared)
	}
	if err := lib.BackendAvailable(binding.BackendSDCPP); err != nil {
		t.Skipf("sdcpp backend unavailable (build with make, which passes -DSTEPWISE_SDCPP_DIR): %v", err)
	}
	return lib
}

// SD15Random is a random-weight diffusers model with SD 1.5's real sizes (the
// only kind stable-diffusion.cpp loads), float32, about 4.3 GB: made once in
// a folder of the system's temp dir named after what makes it, and reused by
// later runs and other test binaries. It is built beside its final name and
// renamed into place, so a run that is killed half-way leaves no half model
// behind it. Callers must not modify it.
func SD15Random(t testing.TB, lib *binding.Library) string {
	t.Helper()
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("stepwise-sd15-random-seed%d-abi%d", SD15RandomSeed, binding.ABIVersion))
	if _, err := os.Stat(filepath.Join(dir, "model_index.json")); err == nil {
		return dir
	}
	tmp, err := os.MkdirTemp(os.TempDir(), "stepwise-sd15-random-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	if err := models.MakeRandomSD(lib, tmp, models.SD15Arch(), SD15RandomSeed); err != nil {
		t.Fatalf("make the random SD 1.5-sized model: %v", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		// Another test binary made it first.
		if _, statErr := os.Stat(filepath.Join(dir, "model_index.json")); statErr != nil {
			t.Fatalf("rename %s: %v", tmp, err)
		}
	}
	return dir
}
