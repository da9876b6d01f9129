package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// apiError is an error with its HTTP status.
type apiError struct {
	status int
	msg    string
	err    error // the typed error behind it, if any, for errors.Is/As
}

func (e *apiError) Error() string { return e.msg }

func (e *apiError) Unwrap() error { return e.err }

func badRequest(format string, a ...any) error {
	return &apiError{status: http.StatusBadRequest, msg: fmt.Sprintf(format, a...)}
}

// badRequestErr is err as a 400, still matching what err matches.
func badRequestErr(err error) error {
	return &apiError{status: http.StatusBadRequest, msg: err.Error(), err: err}
}

// ErrQueueFull is returned when the queue holds its maximum.
var ErrQueueFull = errors.New("the job queue is full")

// ErrShuttingDown is returned for jobs submitted during shutdown.
var ErrShuttingDown = errors.New("the server is shutting down")

// errCancelled ends a job that was cancelled (by a client, /sdapi/v1/interrupt or shutdown).
var errCancelled = errors.New("cancelled")

// statusOf maps an error to an HTTP status by its type; whatever is not known
// to be the client's doing is the server's (500).
func statusOf(err error) int {
	var ae *apiError
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &ae):
		return ae.status
	case errors.As(err, &mbe):
		return http.StatusRequestEntityTooLarge
	case errors.Is(err, ErrQueueFull):
		return http.StatusTooManyRequests
	case errors.Is(err, ErrShuttingDown):
		return http.StatusServiceUnavailable
	case errors.Is(err, errCancelled), errors.Is(err, binding.ErrCancelled), errors.Is(err, context.Canceled):
		return http.StatusConflict
	case errors.Is(err, pipeline.ErrBadImage), errors.Is(err, pipeline.ErrNoSubject),
		errors.Is(err, binding.ErrInvalidArgument):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}
