"""The parts of model loading; import the public API from kubeinfer.engine.model_loader."""
