"""One block loop for every layout: the one-process run is the pipeline where one process owns every denoising
step and decodes (`LocalDownstream`); over several processes the same loop runs on rank 0 with the ranks behind
it (`avatars.liveavatar.distributed`)."""
