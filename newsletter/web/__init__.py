"""`newsletter serve`: the readers' side of the newsletter, as a small ASGI service.

The whole public surface is the route table in app.py; each module holds the handlers of
one job and calls the same store and policy functions as the command line.
"""
