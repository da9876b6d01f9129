package server

import (
	_ "embed"
	"net/http"
)

//go:embed static/index.html
var indexHTML []byte

// faviconPNG is the tab icon; served at the path browsers ask for unprompted,
// so a new user's console shows no 404.
//
//go:embed static/favicon.png
var faviconPNG []byte

func (s *Server) handlePage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' blob: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self' ws: wss:")
	w.Write(indexHTML)
}

func handleFavicon(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "image/png")
	w.Header().Set("Cache-Control", "public, max-age=86400")
	w.Write(faviconPNG)
}
