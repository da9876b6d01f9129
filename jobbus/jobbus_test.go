package jobbus

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEventSubjectsRoundTrip(t *testing.T) {
	for _, kind := range []string{KindState, KindProgress, KindPreview} {
		id, k, ok := ParseEventSubject(EventSubject("3f9c0e6a1b2d4c5e", kind))
		require.True(t, ok, kind)
		assert.Equal(t, "3f9c0e6a1b2d4c5e", id)
		assert.Equal(t, kind, k)
	}
	for _, bad := range []string{"", "stepwise.job.", "stepwise.job.id", "other.job.id.state", CancelSubject("id")} {
		_, _, ok := ParseEventSubject(bad)
		assert.False(t, ok, bad)
	}
}

func TestMetaCheck(t *testing.T) {
	gw := Meta{Protocol: Protocol, Version: "1.2.0", ABI: 3}
	tests := []struct {
		name   string
		worker Meta
		ok     bool
	}{
		{"same", gw, true},
		{"another version", Meta{Protocol: Protocol, Version: "1.3.0", ABI: 3}, false},
		{"another ABI", Meta{Protocol: Protocol, Version: "1.2.0", ABI: 4}, false},
		{"another protocol", Meta{Protocol: Protocol + 1, Version: "1.2.0", ABI: 3}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := gw.Check(tt.worker)
			if tt.ok {
				assert.NoError(t, err)
				return
			}
			assert.ErrorIs(t, err, ErrMismatch)
		})
	}
}
