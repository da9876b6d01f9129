package server_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"image"
	"image/png"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/server"
)

// pngChunk encodes one PNG chunk with its CRC.
func pngChunk(typ string, data []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.BigEndian, uint32(len(data)))
	b.WriteString(typ)
	b.Write(data)
	binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(append([]byte(typ), data...)))
	return b.Bytes()
}

// declaredPNG is a PNG whose header declares w x h gray pixels and that holds
// no pixel data at all: a few dozen bytes asking for w*h of memory.
func declaredPNG(w, h int) []byte {
	var ihdr bytes.Buffer
	binary.Write(&ihdr, binary.BigEndian, uint32(w))
	binary.Write(&ihdr, binary.BigEndian, uint32(h))
	ihdr.Write([]byte{8, 0, 0, 0, 0}) // 8-bit gray
	out := []byte("\x89PNG\r\n\x1a\n")
	out = append(out, pngChunk("IHDR", ihdr.Bytes())...)
	return append(out, pngChunk("IEND", nil)...)
}

var (
	bombOnce sync.Once
	bomb     string
)

// bombPNG is a real, fully decodable 8192x8192 PNG of ~70 KB: decoding it
// costs hundreds of MB.
func bombPNG(t *testing.T) string {
	bombOnce.Do(func() {
		var buf bytes.Buffer
		enc := png.Encoder{CompressionLevel: png.BestSpeed}
		require.NoError(t, enc.Encode(&buf, image.NewGray(image.Rect(0, 0, 8192, 8192))))
		bomb = base64.StdEncoding.EncodeToString(buf.Bytes())
	})
	return bomb
}

func truncatedPNG(t *testing.T, w, h int) string {
	raw, err := base64.StdEncoding.DecodeString(pngB64(t, w, h, 9))
	require.NoError(t, err)
	return base64.StdEncoding.EncodeToString(raw[:len(raw)*2/3])
}

// rawRequest sends bytes on a fresh connection and returns the response.
func rawRequest(t *testing.T, addr, req string) (*http.Response, map[string]any) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, req)
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	var out map[string]any
	raw, _ := io.ReadAll(resp.Body)
	require.NoError(t, json.Unmarshal(raw, &out), string(raw))
	return resp, out
}

func stillServing(t *testing.T, e *env) {
	t.Helper()
	id := submit(t, e, txt(1))
	c := e.dial(t, "/v1/jobs/"+id+"/events")
	s := collect(t, c, id)
	require.Equal(t, "completed", s.events[len(s.events)-1]["type"])
}

// Every image the server takes — init image, mask, upload, in any endpoint —
// is held to the pixel limit from its header, before it is decoded; memory
// stays bounded however many such requests arrive.
func TestImagesAreCheckedFromTheirHeaderEverywhere(t *testing.T) {
	e := start(t, server.Config{})
	small := pngB64(t, 64, 64, 40)
	huge := base64.StdEncoding.EncodeToString(declaredPNG(8192, 8192))
	zero := base64.StdEncoding.EncodeToString(declaredPNG(0, 0))
	cases := []struct {
		name, path string
		body       map[string]any
		want       string
	}{
		{"img2img image", "/v1/jobs", map[string]any{"kind": "img2img", "prompt": "x", "image": huge}, "pixels allowed"},
		{"inpaint mask", "/v1/jobs", map[string]any{"kind": "inpaint", "prompt": "x", "image": small, "mask": huge}, "pixels allowed"},
		{"zero-size image", "/v1/jobs", map[string]any{"kind": "img2img", "prompt": "x", "image": zero}, "non-positive dimension"},
		{"segment", "/v1/segment", map[string]any{"image": huge}, "pixels allowed"},
		{"edit", "/v1/edit", map[string]any{"prompt": "x", "image": huge}, "pixels allowed"},
		{"a1111 img2img", "/sdapi/v1/img2img", map[string]any{"prompt": "x", "init_images": []string{huge}}, "pixels allowed"},
		{"a1111 inverted mask", "/sdapi/v1/img2img", map[string]any{"prompt": "x", "init_images": []string{small},
			"mask": huge, "inpainting_mask_invert": 1}, "pixels allowed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, out := e.post(t, tc.path, tc.body)
			assert.Equal(t, http.StatusBadRequest, code, out)
			assert.Contains(t, fmt.Sprint(out), tc.want)
		})
	}
	// The multipart path too.
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	mw.WriteField("kind", "img2img")
	mw.WriteField("prompt", "x")
	fw, _ := mw.CreateFormFile("image", "huge.png")
	fw.Write(declaredPNG(8192, 8192))
	mw.Close()
	resp, err := http.Post(e.http.URL+"/v1/jobs", mw.FormDataContentType(), &body)
	require.NoError(t, err)
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode, string(raw))
	assert.Contains(t, string(raw), "pixels allowed")

	// A real 8192x8192 image (~70 KB of PNG, ~780 MB to decode as the A1111
	// mask inversion once did): concurrent requests allocate next to nothing.
	b := bombPNG(t)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	var wg sync.WaitGroup
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data, _ := json.Marshal(map[string]any{"prompt": "x", "init_images": []string{small}, "mask": b,
				"inpainting_mask_invert": 1})
			resp, err := http.Post(e.http.URL+"/sdapi/v1/img2img", "application/json", bytes.NewReader(data))
			if assert.NoError(t, err) {
				assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	runtime.ReadMemStats(&after)
	assert.Less(t, after.TotalAlloc-before.TotalAlloc, uint64(64<<20), "bytes allocated by 6 requests")
	stillServing(t, e)
}

// Errors that depend on the input are found at submission (a 4xx), never
// after the 202.
func TestInputErrorsAreRefusedAtSubmission(t *testing.T) {
	e := start(t, server.Config{MaxSide: 256})
	img64, img128, img512 := pngB64(t, 64, 64, 40), pngB64(t, 128, 128, 40), pngB64(t, 512, 512, 40)
	tests := []struct {
		name string
		body map[string]any
		want string
	}{
		{"mask of the wrong size", map[string]any{"kind": "inpaint", "prompt": "x", "image": img64, "mask": img128}, "same size"},
		{"truncated image", map[string]any{"kind": "img2img", "prompt": "x", "image": truncatedPNG(t, 64, 64)}, "image"},
		{"truncated mask", map[string]any{"kind": "inpaint", "prompt": "x", "image": img64, "mask": truncatedPNG(t, 64, 64)}, "mask"},
		{"class out of range", map[string]any{"kind": "segment", "image": img64, "classes": []int{7}}, "out of range"},
		{"negative class", map[string]any{"kind": "edit", "prompt": "x", "image": img64, "classes": []int{-1}}, "out of range"},
		{"img2img past max-size", map[string]any{"kind": "img2img", "prompt": "x", "image": img512}, "outside 8..256"},
		{"inpaint past max-size", map[string]any{"kind": "inpaint", "prompt": "x", "image": img512, "mask": img512}, "outside 8..256"},
		{"segment_scale past the pixel limit", map[string]any{"kind": "segment", "image": img64, "segment_scale": 5}, "segment_scale"},
		{"image too small to segment", map[string]any{"kind": "segment", "image": pngB64(t, 16, 16, 3)}, "needs at least"},
		{"txt2img with an image", map[string]any{"kind": "txt2img", "prompt": "x", "image": img64}, "takes no image"},
		{"strength that leaves no step", map[string]any{"kind": "img2img", "prompt": "x", "image": img64, "steps": 1}, "no step"},
		{"explicit strength that leaves no step", map[string]any{"kind": "inpaint", "prompt": "x", "image": img64, "mask": img64,
			"steps": 3, "denoising_strength": 0.2}, "no step"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out := e.post(t, "/v1/jobs", tt.body)
			assert.Equal(t, http.StatusBadRequest, code, out)
			assert.Contains(t, fmt.Sprint(out["error"]), tt.want)
		})
	}
	// Within the limits: img2img of the large image resized by width/height is taken.
	id := submit(t, e, map[string]any{"kind": "img2img", "prompt": "x", "image": img512, "width": 64, "height": 64, "steps": 2})
	s := collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id)
	assert.Equal(t, "completed", s.events[len(s.events)-1]["type"])
	// segment_scale's pixel bound applies to the scaled image: a server with a small pixel limit refuses scale 4.
	small := start(t, server.Config{MaxPixels: 128 * 128})
	code, out := small.post(t, "/v1/jobs", map[string]any{"kind": "segment", "image": img128, "segment_scale": 4})
	assert.Equal(t, http.StatusBadRequest, code, out)
	assert.Contains(t, fmt.Sprint(out["error"]), "512x512, more than the 16384 pixels")
}

// Every parameter is bounded; text is bounded and whole (no NUL).
func TestEveryParameterIsBounded(t *testing.T) {
	e := start(t, server.Config{})
	img := pngB64(t, 64, 64, 40)
	job := func(extra map[string]any) map[string]any {
		b := map[string]any{"kind": "txt2img", "prompt": "x", "width": 64, "height": 64}
		for k, v := range extra {
			b[k] = v
		}
		return b
	}
	edit := func(extra map[string]any) map[string]any {
		b := map[string]any{"kind": "edit", "prompt": "x", "image": img}
		for k, v := range extra {
			b[k] = v
		}
		return b
	}
	many := make([]int, 300)
	tests := []struct {
		name string
		body map[string]any
		want string
	}{
		{"long prompt", job(map[string]any{"prompt": strings.Repeat("a", 5000)}), "prompt is 5000 bytes"},
		{"long negative prompt", job(map[string]any{"negative_prompt": strings.Repeat("a", 5000)}), "negative_prompt is 5000 bytes"},
		{"NUL in prompt", job(map[string]any{"prompt": "a cat\x00 and the rest"}), "NUL"},
		{"NUL in negative prompt", job(map[string]any{"negative_prompt": "\x00"}), "NUL"},
		{"width 0", job(map[string]any{"width": 0}), "width is 0"},
		{"height 0", job(map[string]any{"height": 0}), "height is 0"},
		{"width not a multiple of 8", job(map[string]any{"width": 100}), "multiple of 8"},
		{"negative width", job(map[string]any{"width": -64}), "multiple of 8"},
		{"cfg too high", job(map[string]any{"cfg_scale": 1e9}), "cfg_scale"},
		{"strength above 1", job(map[string]any{"denoising_strength": 2}), "denoising_strength"},
		{"mask blur", job(map[string]any{"mask_blur": 1e6}), "mask_blur"},
		{"preview every", job(map[string]any{"preview_every": 0}), "preview_every"},
		{"batch", job(map[string]any{"batch_size": 1000}), "batch_size"},
		{"seed too large", job(map[string]any{"seed": 1 << 62}), "seed"},
		{"seed below -1", job(map[string]any{"seed": -5}), "seed"},
		{"enormous grow", edit(map[string]any{"grow": 1000000000}), "grow"},
		{"enormous shrink", edit(map[string]any{"grow": -1000000000}), "grow"},
		{"segment scale", edit(map[string]any{"segment_scale": 100}), "segment_scale"},
		{"too many classes", edit(map[string]any{"classes": many}), "classes lists 300"},
		{"working size", edit(map[string]any{"working_size": 100000}), "working_size"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out := e.post(t, "/v1/jobs", tt.body)
			assert.Equal(t, http.StatusBadRequest, code, out)
			assert.Contains(t, fmt.Sprint(out["error"]), tt.want)
		})
	}
	// A prompt of the largest allowed length runs; the engine reads 75 tokens of it.
	id := submit(t, e, job(map[string]any{"prompt": strings.Repeat("a ", 2048), "steps": 1}))
	s := collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id)
	require.Equal(t, "completed", s.events[len(s.events)-1]["type"])
	// The largest grow the server allows finishes (in time proportional to the image, not to grow).
	id = submit(t, e, edit(map[string]any{"grow": 2048, "steps": 1}))
	s = collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id)
	last := s.events[len(s.events)-1]
	require.Contains(t, []any{"completed", "failed"}, last["type"])
	if last["type"] == "failed" {
		assert.Contains(t, last["error"], "repaint", "a grow that covers everything has nothing left to keep")
	}
}

// The Host header must name this server: a DNS-rebinding page (evil.example
// resolving to 127.0.0.1) is refused, whatever its Origin says.
func TestHostHeaderDefeatsDNSRebinding(t *testing.T) {
	e := start(t, server.Config{AllowedHosts: []string{"studio.lan"}})
	addr := strings.TrimPrefix(e.http.URL, "http://")
	_, port, _ := net.SplitHostPort(addr)
	for _, tc := range []struct {
		host   string
		status int
	}{
		{"evil.example:" + port, 403},
		{"evil.example", 403},
		{"127.0.0.1.evil.example:" + port, 403},
		{"localhost.evil.example", 403},
		{"", 403},
		{"127.0.0.1:" + port, 200},
		{"[::1]:" + port, 200},
		{"localhost:" + port, 200},
		{"app.localhost:" + port, 200},
		{"studio.lan:" + port, 200},
		{"STUDIO.LAN", 200},
	} {
		resp, out := rawRequest(t, addr, "GET /v1/jobs HTTP/1.1\r\nHost: "+tc.host+"\r\nOrigin: http://"+tc.host+"\r\nConnection: close\r\n\r\n")
		assert.Equal(t, tc.status, resp.StatusCode, "Host %q: %v", tc.host, out)
	}
	// Websocket upgrades go through the same check.
	url := "ws" + strings.TrimPrefix(e.http.URL, "http") + "/v1/events"
	d := websocket.Dialer{NetDial: func(network, _ string) (net.Conn, error) { return net.Dial(network, addr) }}
	_, resp, err := d.Dial(strings.Replace(url, "127.0.0.1", "evil.example", 1), nil)
	require.Error(t, err)
	require.NotNil(t, resp)
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
}

// listen serves e's server on a real listener with its own caps and deadlines.
func listen(t *testing.T, e *env) string {
	t.Helper()
	ln, err := e.srv.Listen(context.Background(), "127.0.0.1:0")
	require.NoError(t, err)
	hs := e.srv.HTTPServer()
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	return ln.Addr().String()
}

// Slow or idle clients cannot hold the server: a connection cap answers 503
// past it, a read deadline closes a body that never ends, and websockets have
// their own cap.
func TestConnectionsAreCappedAndSlowBodiesCut(t *testing.T) {
	e := start(t, server.Config{MaxConns: 4, MaxWebsockets: 2, ReadTimeout: time.Second})
	addr := listen(t, e)
	var held []net.Conn
	for i := 0; i < 4; i++ {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		// A request whose body never comes.
		_, err = io.WriteString(c, "POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
		require.NoError(t, err)
		held = append(held, c)
	}
	// The fifth connection is turned away at once while the four are held
	// (the caps are counted before any deadline can free a slot).
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	raw, _ := io.ReadAll(resp.Body)
	assert.Contains(t, string(raw), "too many connections")
	c.Close()
	// The held slow bodies are cut by the read deadline: the server answers
	// or closes each of them (the test waits for it; a hang fails by timeout).
	for _, c := range held {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		_, err := io.ReadAll(c)
		var ne net.Error
		require.False(t, errors_As(err, &ne) && ne.Timeout(), "the server never cut the slow body")
		c.Close()
	}
	// Serving goes on once they are gone.
	var ok bool
	for i := 0; i < 50 && !ok; i++ {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			ok = resp.StatusCode == 200
			resp.Body.Close()
		}
		if !ok {
			time.Sleep(100 * time.Millisecond)
		}
	}
	require.True(t, ok, "healthz after the slow clients went")

	// Websockets: two open, the third is refused with 503 JSON.
	url := "ws://" + addr + "/v1/events"
	for i := 0; i < 2; i++ {
		ws, _, err := websocket.DefaultDialer.Dial(url, nil)
		require.NoError(t, err)
		defer ws.Close()
	}
	_, resp, err = websocket.DefaultDialer.Dial(url, nil)
	require.Error(t, err)
	require.NotNil(t, resp)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
}

func errors_As(err error, target *net.Error) bool {
	if err == nil {
		return false
	}
	ne, ok := err.(net.Error)
	if ok {
		*target = ne
	}
	return ok
}

// The A1111 endpoints answer client errors with 4xx, never 500; a malformed
// chunked body is a 400 everywhere.
func TestClientErrorsAre4xxOnEveryEndpoint(t *testing.T) {
	e := start(t, server.Config{})
	for _, tc := range []struct {
		name, path string
		body       map[string]any
	}{
		{"steps 0 given as -1", "/sdapi/v1/txt2img", map[string]any{"prompt": "x", "steps": -1}},
		{"unknown sampler", "/sdapi/v1/txt2img", map[string]any{"prompt": "x", "sampler_name": "k_nope", "width": 64, "height": 64}},
		{"width past max", "/sdapi/v1/txt2img", map[string]any{"prompt": "x", "width": 100000, "height": 64}},
		{"bad base64", "/sdapi/v1/img2img", map[string]any{"prompt": "x", "init_images": []string{"%%%"}}},
		{"mask size", "/sdapi/v1/img2img", map[string]any{"prompt": "x", "init_images": []string{pngB64(t, 64, 64, 1)},
			"mask": pngB64(t, 32, 32, 1)}},
		{"no init image", "/sdapi/v1/img2img", map[string]any{"prompt": "x"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out := e.post(t, tc.path, tc.body)
			assert.GreaterOrEqual(t, code, 400, out)
			assert.Less(t, code, 500, out)
		})
	}
	addr := strings.TrimPrefix(e.http.URL, "http://")
	for _, path := range []string{"/v1/jobs", "/sdapi/v1/txt2img", "/v1/edit"} {
		resp, out := rawRequest(t, addr, "POST "+path+" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"+
			"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s: %v", path, out)
	}
}

// Multipart fields are read by the type of the parameter they name: a prompt
// of "true" stays a prompt, a number that is not one is refused.
func TestMultipartFieldsKeepTheirTypes(t *testing.T) {
	e := start(t, server.Config{})
	post := func(fields map[string]string) (int, map[string]any) {
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		for k, v := range fields {
			mw.WriteField(k, v)
		}
		mw.Close()
		resp, err := http.Post(e.http.URL+"/v1/jobs", mw.FormDataContentType(), &body)
		require.NoError(t, err)
		defer resp.Body.Close()
		var out map[string]any
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
		return resp.StatusCode, out
	}
	code, out := post(map[string]string{"kind": "txt2img", "prompt": "true", "negative_prompt": "12", "width": "64",
		"height": "64", "steps": "1", "cfg_scale": "5.5"})
	require.Equal(t, http.StatusAccepted, code, out)
	params := out["parameters"].(map[string]any)
	assert.Equal(t, "true", params["prompt"])
	assert.Equal(t, "12", params["negative_prompt"])
	assert.EqualValues(t, 5.5, params["cfg_scale"])
	code, out = post(map[string]string{"kind": "txt2img", "prompt": "x", "steps": "many"})
	assert.Equal(t, http.StatusBadRequest, code, out)
	assert.Contains(t, out["error"], "steps")
	code, out = post(map[string]string{"kind": "txt2img", "prompt": "x", "width": "0"})
	assert.Equal(t, http.StatusBadRequest, code, out)
}

// The run-file handler serves regular files that runs wrote, never what a
// symbolic link planted under the data folder points at.
func TestRunFilesNeverFollowSymlinks(t *testing.T) {
	e := start(t, server.Config{})
	secret := filepath.Join(t.TempDir(), "secret.txt")
	require.NoError(t, os.WriteFile(secret, []byte("top secret"), 0o600))
	run := filepath.Join(e.runs, "20261125T000000Z-feedf00d")
	require.NoError(t, os.MkdirAll(run, 0o755))
	require.NoError(t, os.Symlink(secret, filepath.Join(run, "edited.png")))
	require.NoError(t, os.WriteFile(filepath.Join(run, "mask.png"), []byte("ok"), 0o644))
	// A run folder that is itself a link.
	require.NoError(t, os.Symlink(run, filepath.Join(e.runs, "20261125T000000Z-deadbeef")))
	// A FIFO where a file should be must not block the handler.
	require.NoError(t, mkfifo(filepath.Join(run, "image-0.png")))
	for _, path := range []string{
		"/v1/runs/20261125T000000Z-feedf00d/edited.png",
		"/v1/runs/20261125T000000Z-deadbeef/mask.png",
		"/v1/runs/20261125T000000Z-feedf00d/image-0.png",
	} {
		resp, err := http.Get(e.http.URL + path)
		require.NoError(t, err)
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, http.StatusNotFound, resp.StatusCode, path)
		assert.NotContains(t, string(raw), "top secret")
	}
	resp, err := http.Get(e.http.URL + "/v1/runs/20261125T000000Z-feedf00d/mask.png")
	require.NoError(t, err)
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "ok", string(raw))
}

// Shutdown returns after its grace whatever the running job does: it cancels
// the job and gives up waiting for it after a bounded time.
func TestShutdownEndsAfterItsGrace(t *testing.T) {
	e := start(t, server.Config{})
	id := submit(t, e, txt(150))
	waitForEvent(t, e.dial(t, "/v1/jobs/"+id+"/events"), "progress")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := e.srv.Shutdown(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	var v map[string]any
	e.get(t, "/v1/jobs/"+id, &v)
	assert.Equal(t, "cancelled", v["state"], "the job was cancelled when the grace ran out")
}

// waitForEvent reads c until an event of type typ arrives.
func waitForEvent(t *testing.T, c *websocket.Conn, typ string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	for {
		_, data, err := c.ReadMessage()
		require.NoError(t, err)
		if bytes.Contains(data, []byte(`"type":"`+typ+`"`)) {
			return
		}
	}
}

func mkfifo(path string) error { return syscall.Mkfifo(path, 0o644) }

// Cancel lands inside a denoising step: at 1024² one step of even the tiny
// model takes minutes on a small CPU, and a cancel sent during the first step
// ends the job before that step reports.
func TestCancelLandsInsideAStep(t *testing.T) {
	e := start(t, server.Config{})
	id := submit(t, e, map[string]any{"kind": "txt2img", "prompt": "x", "width": 1024, "height": 1024, "steps": 2,
		"preview": "none"})
	c := e.dial(t, "/v1/jobs/"+id+"/events")
	waitForEvent(t, c, "started")
	time.Sleep(500 * time.Millisecond) // well inside the first step
	code, out := e.post(t, "/v1/jobs/"+id+"/cancel", "")
	require.Equal(t, http.StatusAccepted, code, out)
	s := collect(t, c, id)
	assert.Equal(t, "cancelled", s.events[len(s.events)-1]["type"])
	assert.Zero(t, count(s.events, "progress"), "the job stopped inside its first step")
}

// Model files that would have killed the process — a config with a zero group
// count (SIGFPE), an unpickler exploit, a FIFO where weights belong — are
// contained: the catalog lists what it can without blocking, the jobs naming
// them fail with a clear error, and the server keeps serving.
func TestBrokenModelFilesAreContained(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	dir := t.TempDir()
	testenv.CopyTree(t, sdDir, filepath.Join(dir, "tiny"))
	testenv.CopyTree(t, sdDir, filepath.Join(dir, "badgroups"))
	cfgPath := filepath.Join(dir, "badgroups", "unet", "config.json")
	var cfg map[string]any
	raw, err := os.ReadFile(cfgPath)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(raw, &cfg))
	cfg["norm_num_groups"] = 0
	raw, _ = json.Marshal(cfg)
	require.NoError(t, os.WriteFile(cfgPath, raw, 0o644))
	// A pickle that would call eval("1") if unpickled naively.
	evil := []byte("\x80\x02c__builtin__\neval\nq\x00X\x01\x00\x00\x001q\x01\x85q\x02Rq\x03.")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "evil.ckpt"), evil, 0o644))
	require.NoError(t, mkfifo(filepath.Join(dir, "pipe.safetensors")))

	cat, err := catalog.Open(dir, t.TempDir())
	require.NoError(t, err, "a FIFO in the folder neither blocks nor breaks the scan")
	_, err = cat.Find(catalog.KindCheckpoint, "pipe")
	require.ErrorIs(t, err, catalog.ErrUnknownModel, "special files are not models")
	e := start(t, server.Config{Catalog: cat, Model: filepath.Join(dir, "tiny")})

	for _, tc := range []struct{ model, want string }{
		{"badgroups", "norm_num_groups"},
		{"evil", "refusing class __builtin__.eval"},
	} {
		b := txt(1)
		b["model"] = tc.model
		id := submit(t, e, b)
		s := collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id)
		last := s.events[len(s.events)-1]
		require.Equal(t, "failed", last["type"], "%s: %v", tc.model, last)
		assert.Contains(t, last["error"], tc.want)
	}
	code, out := e.post(t, "/v1/models/load", map[string]any{"kind": "sd", "model": "badgroups"})
	assert.NotEqual(t, http.StatusOK, code, out)
	assert.Contains(t, out["error"], "norm_num_groups")
	stillServing(t, e)
}
