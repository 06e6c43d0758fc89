"""The user's process: the Client, its arrays, functions and programs, and the command stream
that carries their calls to the controller. Imports the floor (proto/) only."""
