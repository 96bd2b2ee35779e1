"""Sample loading, observers, exponent-bias selection and BatchNorm re-estimation."""
