package server

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// Timeouts of the HTTP server that are not settings: headers arrive at once
// or never, and an idle keep-alive connection gives its slot back.
const (
	readHeaderTimeout = 10 * time.Second
	idleTimeout       = 2 * time.Minute
)

// HTTPServer is the http.Server for Handler with the server's read deadlines:
// a request's headers within readHeaderTimeout and the whole request, body
// included, within ReadTimeout. Responses have no deadline (a synchronous
// request waits for its job); the connection cap of Listen bounds them.
func (s *Server) HTTPServer() *http.Server {
	return &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       s.cfg.ReadTimeout,
		IdleTimeout:       idleTimeout,
	}
}

// Listen listens on addr with at most MaxConns connections open at once; a
// connection past the cap is answered 503 and closed at once, so slow or idle
// clients cannot hold the server's memory or file descriptors without bound.
func (s *Server) Listen(ctx context.Context, addr string) (net.Listener, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &capListener{Listener: ln, max: s.cfg.MaxConns}, nil
}

// capListener counts open connections and turns away those past max.
type capListener struct {
	net.Listener
	max  int
	mu   sync.Mutex
	open int
}

var overCapacity = func() []byte {
	body := `{"error":"too many connections: try again in a moment","status":503}` + "\n"
	return []byte(fmt.Sprintf("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"+
		"Content-Length: %d\r\n\r\n%s", len(body), body))
}()

func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.mu.Lock()
		full := l.open >= l.max
		if !full {
			l.open++
		}
		l.mu.Unlock()
		if full {
			go func() {
				c.SetWriteDeadline(time.Now().Add(time.Second))
				c.Write(overCapacity)
				c.Close()
			}()
			continue
		}
		return &countedConn{Conn: c, l: l}, nil
	}
}

type countedConn struct {
	net.Conn
	l    *capListener
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		c.l.open--
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
