package server_test

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/server"
)

// requestLog records the status of every request the server answers, so a
// test sees what the browser asked for, favicon included, however it asked.
type requestLog struct {
	mu   sync.Mutex
	seen []loggedRequest
}

type loggedRequest struct {
	Path        string
	Status      int
	ContentType string
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

// Hijack lets the websocket upgrade take the connection (101 Switching Protocols).
func (r *statusRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	r.status = http.StatusSwitchingProtocols
	return http.NewResponseController(r.ResponseWriter).Hijack()
}

func (l *requestLog) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		l.mu.Lock()
		l.seen = append(l.seen, loggedRequest{Path: r.URL.Path, Status: rec.status, ContentType: w.Header().Get("Content-Type")})
		l.mu.Unlock()
	})
}

func (l *requestLog) all() []loggedRequest {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]loggedRequest(nil), l.seen...)
}

// browser starts a headless Chromium for the test, or skips the test when
// Chromium is not installed (scripts/setup.sh --test installs it).
func browser(t *testing.T) context.Context {
	t.Helper()
	var path string
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		t.Skip("the page test needs Chromium (scripts/setup.sh --test installs Debian's chromium)")
	}
	profile, err := os.MkdirTemp("", "stepwise-chromium-")
	require.NoError(t, err)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(path), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(profile), chromedp.WindowSize(1200, 800))
	ctx, cancel := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		cancel()
		cancelAlloc()
		// Chromium's helpers can still be writing the profile for a moment.
		for i := 0; i < 20 && os.RemoveAll(profile) != nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
	})
	return ctx
}

// pageState is what the page shows, read in the browser.
type pageState struct {
	Previews      int    `json:"previews"`
	PreviewShown  bool   `json:"previewShown"`
	PreviewLoaded bool   `json:"previewLoaded"`
	BrokenImages  int    `json:"brokenImages"`
	Done          bool   `json:"done"`
	Results       int    `json:"results"`
	ResultsLoaded bool   `json:"resultsLoaded"`
	Status        string `json:"status"`
}

// A visible image that has not decoded is the broken-image icon a user sees.
const probePage = `(() => {
	const shown = (i) => i.getClientRects().length > 0 && getComputedStyle(i).visibility !== "hidden";
	const loaded = (i) => i.complete && i.naturalWidth > 0;
	const preview = document.getElementById("preview");
	const results = [...document.querySelectorAll("#results img.result")];
	return {
		previews: (window.stepwise || {}).previews || 0,
		previewShown: shown(preview),
		previewLoaded: loaded(preview),
		brokenImages: [...document.images].filter((i) => shown(i) && !loaded(i)).length,
		done: !!(window.stepwise || {}).done,
		results: results.length,
		resultsLoaded: results.length > 0 && results.every(loaded),
		status: document.getElementById("status").textContent,
	};
})()`

// The page at /, used as a new user would: before any job it shows an empty
// frame, no broken image; the form submits a job; live previews and the result
// appear; no request fails and nothing is logged as an error, favicon included.
func TestPageShowsLivePreviewsAndResult(t *testing.T) {
	ctx := browser(t)
	e := start(t, server.Config{})
	var requests requestLog
	hs := httptest.NewServer(requests.wrap(e.srv.Handler()))
	t.Cleanup(hs.Close)

	var mu sync.Mutex
	var problems []string
	require.NoError(t, chromedp.Listen(ctx, func(ev any) {
		mu.Lock()
		defer mu.Unlock()
		switch ev := ev.(type) {
		case *network.EventResponseReceived:
			if ev.Response.Status >= 400 {
				problems = append(problems, "HTTP "+ev.Response.StatusText+" for "+ev.Response.URL)
			}
		case *network.EventLoadingFailed:
			if !ev.Canceled {
				problems = append(problems, "request failed: "+ev.ErrorText)
			}
		case *cdplog.EventEntryAdded: // "Failed to load resource" and the like
			if ev.Entry.Level == cdplog.EntryLevelError {
				problems = append(problems, "browser log: "+ev.Entry.Text+" "+ev.Entry.URL)
			}
		case *runtime.EventConsoleAPICalled:
			if ev.Type == runtime.ConsoleAPICalledTypeError {
				problems = append(problems, "console.error from the page")
			}
		case *runtime.EventExceptionThrown:
			problems = append(problems, "exception: "+ev.ExceptionDetails.Text)
		}
	}))

	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(hs.URL+"/"), chromedp.WaitVisible(chromedp.CSS("#go"))))
	// The samplers list loads after the page; wait for it so its request is seen.
	_, err := chromedp.Run(ctx, chromedp.Poll[bool](`document.querySelectorAll("#sampler option").length > 0`,
		chromedp.WithPollingTimeout(30*time.Second)))
	require.NoError(t, err)
	before, err := chromedp.Run(ctx, chromedp.Evaluate[pageState](probePage))
	require.NoError(t, err)
	assert.Zero(t, before.BrokenImages, "no broken image before the first job")
	assert.False(t, before.PreviewShown, "an empty frame until a preview arrives")
	// Headless Chromium may or may not fetch the icon unasked; the page loads it
	// the way a tab does.
	iconWidth, err := chromedp.Run(ctx, chromedp.Evaluate[int](`new Promise((ok) => {
		const i = new Image(); i.onload = () => ok(i.naturalWidth); i.onerror = () => ok(0);
		i.src = document.querySelector("link[rel=icon]").href; })`, chromedp.EvalAwaitPromise))
	require.NoError(t, err)
	assert.Positive(t, iconWidth, "the favicon is an image")

	require.NoError(t, chromedp.Do(ctx,
		chromedp.SetValue(chromedp.CSS("#prompt"), "a lighthouse at sunset"),
		chromedp.SetValue(chromedp.CSS("#steps"), "10"),
		chromedp.SetValue(chromedp.CSS("#width"), "64"),
		chromedp.SetValue(chromedp.CSS("#height"), "64"),
		chromedp.Click(chromedp.CSS("#go"))))
	_, err = chromedp.Run(ctx, chromedp.Poll[bool](`!!(window.stepwise && window.stepwise.done)`,
		chromedp.WithPollingTimeout(90*time.Second)))
	require.NoError(t, err, "the job finishes")
	// Result images load after the completed event; give them a moment, then judge.
	chromedp.Run(ctx, chromedp.Poll[bool](`[...document.querySelectorAll("#results img.result")].every((i) => i.complete)`,
		chromedp.WithPollingTimeout(10*time.Second)))
	st, err := chromedp.Run(ctx, chromedp.Evaluate[pageState](probePage))
	require.NoError(t, err)
	t.Logf("page: %+v", st)
	assert.Equal(t, "Done.", st.Status)
	assert.GreaterOrEqual(t, st.Previews, 1, "at least one live preview arrived")
	assert.True(t, st.PreviewShown && st.PreviewLoaded, "the last live preview is on screen")
	assert.GreaterOrEqual(t, st.Results, 1, "the result is shown")
	assert.True(t, st.ResultsLoaded, "the result image loaded")
	assert.Zero(t, st.BrokenImages, "no broken image")

	// Keep a screenshot for people to look at.
	chromedp.Run(ctx, chromedp.Evaluate[bool](`window.scrollTo(0, 0), true`))
	if shot, err := chromedp.Run(ctx, chromedp.CaptureScreenshot()); err == nil {
		out := filepath.Join(os.TempDir(), "stepwise-page.png")
		if os.WriteFile(out, shot, 0o644) == nil {
			t.Logf("screenshot: %s", out)
		}
	}

	mu.Lock()
	assert.Empty(t, problems, "no failed request, no console error")
	mu.Unlock()
	var icon []loggedRequest
	for _, r := range requests.all() {
		assert.Less(t, r.Status, 400, "%s answered %d", r.Path, r.Status)
		if r.Path == "/favicon.ico" {
			icon = append(icon, r)
		}
	}
	if assert.NotEmpty(t, icon, "the browser asked for the icon") {
		assert.Equal(t, "image/png", icon[0].ContentType)
	}
}
