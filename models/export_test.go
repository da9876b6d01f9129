package models

// ErrPanicked lets tests tell a recovered panic from a checked refusal.
var ErrPanicked = errPanicked
