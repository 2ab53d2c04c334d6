"""svdserve adapters: the SVD factor cache, the adapter file, and the five adapter methods.

Public entry points:
  load_base_model / BaseModel          adapters.base_model
  load_or_build_factors / LayerFactors adapters.factors
  Adapter, parse_adapter, BaseSpec     adapters.file
  AdaptedModel, load_adapted_model     adapters.runtime
  REGISTRY, get_method                 adapters.methods
"""
