"""`dockercoins up`: the stack's settings, its processes under supervision, the stack itself, its
`dockercoins scale` socket, and the run that ties them together."""
