"""Cluster tooling: the launchers that start a controller and its hosts (in this process, in
subprocesses, on Ray) and wait for them. May import every room below it."""
