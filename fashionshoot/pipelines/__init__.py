"""diffusers ``DiffusionPipeline`` subclasses and their command-line faces.

Nothing is re-exported here so ``import fashionshoot.pipelines`` stays free of diffusers; import
:mod:`fashionshoot.pipelines.photoshoot` for :class:`PhotoshootPipeline`.
"""
