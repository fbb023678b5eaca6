//! How an answer is sampled, as the client asked for it and `validate` checked it: the fields
//! a vehicle's sampler (`proto::Sampling`) and a cloud upstream (`cloud::UpstreamRequest`)
//! both take, kept once.

/// A request's sampling fields. The defaults ask for nothing: no top-k (0), no min-p (0),
/// no penalties (0, and 1 for the repetition penalty), no bias.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    /// (token, bias), ascending by token.
    pub logit_bias: Vec<(i32, f32)>,
}
