"""Package data, installed as `dho_pipeline.manifests`: what the data is (class names, prompt templates)
and the run recipes that reproduce published numbers. No code; read through dho_pipeline.package_data."""
