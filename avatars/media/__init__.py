"""Media in and out, shared by the CLI and the app: the audio and portrait readers, and mp4 writing.

Nothing is imported here: the streaming loop reads PCM through `avatars.media.audio` on machines that have no
video codecs, so a submodule is imported by its own name.
"""
