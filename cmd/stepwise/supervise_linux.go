package main

import "syscall"

// childAttr makes a worker die with the gateway, even one killed with SIGKILL
// that could not stop it: no orphan holds a device.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
