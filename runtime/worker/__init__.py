"""Each worker host's process: instruction intake, the ordered executor, host-to-host transfers,
the data plane and the store. Imports the floor (proto/) and the shared metrics module only."""
