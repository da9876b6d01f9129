package server_test

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/server"
)

// cdp is a minimal Chrome DevTools Protocol client over one websocket.
type cdp struct {
	conn *websocket.Conn
	id   int
}

func (c *cdp) call(t *testing.T, method string, params any) json.RawMessage {
	t.Helper()
	c.id++
	require.NoError(t, c.conn.WriteJSON(map[string]any{"id": c.id, "method": method, "params": params}))
	c.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		var msg struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		require.NoError(t, c.conn.ReadJSON(&msg))
		if msg.ID != c.id {
			continue // an event
		}
		require.Nil(t, msg.Error, "%s failed", method)
		return msg.Result
	}
}

func chromiumPath(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("the page test needs Chromium (make test installs Debian's chromium)")
	return ""
}

// The page at / submits a job, shows live previews over the websocket and
// shows the result, in a real headless browser.
func TestPageShowsLivePreviewsAndResult(t *testing.T) {
	e := start(t, server.Config{})
	// Chromium's helper processes outlive a killed parent for a moment: own the
	// profile folder and kill the whole process group.
	profile, err := os.MkdirTemp("", "stepwise-chromium-")
	require.NoError(t, err)
	cmd := exec.Command(chromiumPath(t), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--user-data-dir="+profile, "--remote-debugging-port=0", "--window-size=1200,800", "about:blank")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		for i := 0; i < 20 && os.RemoveAll(profile) != nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
	})

	wsURL := make(chan string, 1)
	go func() {
		re := regexp.MustCompile(`DevTools listening on (ws://\S+)`)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				wsURL <- m[1]
			}
		}
	}()
	var browserURL string
	select {
	case browserURL = <-wsURL:
	case <-time.After(60 * time.Second):
		t.Fatal("chromium did not start its DevTools endpoint")
	}
	bconn, _, err := websocket.DefaultDialer.Dial(browserURL, nil)
	require.NoError(t, err)
	defer bconn.Close()
	browser := &cdp{conn: bconn}
	page := e.http.URL + "/?prompt=a+lighthouse+at+sunset&steps=10&width=64&height=64&autostart=1"
	var target struct {
		TargetID string `json:"targetId"`
	}
	require.NoError(t, json.Unmarshal(browser.call(t, "Target.createTarget", map[string]any{"url": page}), &target))
	host := strings.TrimPrefix(strings.Split(browserURL, "/devtools/")[0], "ws://")
	pconn, _, err := websocket.DefaultDialer.Dial(fmt.Sprintf("ws://%s/devtools/page/%s", host, target.TargetID), nil)
	require.NoError(t, err)
	defer pconn.Close()
	tab := &cdp{conn: pconn}

	type pageState struct {
		Previews int    `json:"previews"`
		Done     bool   `json:"done"`
		Results  int    `json:"results"`
		Loaded   bool   `json:"loaded"`
		Status   string `json:"status"`
	}
	probe := `JSON.stringify({
		previews: (window.stepwise || {}).previews || 0,
		done: !!(window.stepwise || {}).done,
		results: document.querySelectorAll('#results img.result').length,
		loaded: [...document.querySelectorAll('#results img.result')].every(i => i.complete && i.naturalWidth > 0),
		status: (document.getElementById('status') || {}).textContent || ''})`
	var st pageState
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		var res struct {
			Result struct {
				Value string `json:"value"`
			} `json:"result"`
		}
		require.NoError(t, json.Unmarshal(tab.call(t, "Runtime.evaluate", map[string]any{"expression": probe, "returnByValue": true}), &res))
		if res.Result.Value != "" {
			require.NoError(t, json.Unmarshal([]byte(res.Result.Value), &st))
		}
		if st.Done && st.Loaded && st.Results > 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("page: %+v", st)
	assert.GreaterOrEqual(t, st.Previews, 1, "at least one live preview was shown")
	assert.True(t, st.Done, "the job finished")
	assert.Equal(t, "Done.", st.Status)
	assert.GreaterOrEqual(t, st.Results, 1, "the result is shown")
	assert.True(t, st.Loaded, "the result image loaded")

	// Keep a screenshot for people to look at.
	var shot struct {
		Data string `json:"data"`
	}
	require.NoError(t, json.Unmarshal(tab.call(t, "Page.captureScreenshot", map[string]any{"format": "png"}), &shot))
	png, err := base64.StdEncoding.DecodeString(shot.Data)
	require.NoError(t, err)
	out := filepath.Join(os.TempDir(), "stepwise-page.png")
	if os.WriteFile(out, png, 0o644) == nil {
		t.Logf("screenshot: %s", out)
	}
}
