"""Pure functions: no I/O, no clock, no environment. Everything here is unit-tested."""
