"""
The shared roster sync: ejabberd's commands, their runners and the sync of
a user's groups.
"""
