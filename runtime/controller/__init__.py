"""The controller process: sessions, the planner, the catalog of slices and executables, and the
gRPC face. Imports the floor (proto/), the scheduler and the shared metrics module only."""
