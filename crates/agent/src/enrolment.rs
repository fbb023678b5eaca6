//! A node's enrolment as one token: what `fleetgrid nodes add` prints in a cluster and the agent
//! takes as its credential.
//!
//! The token is `CREDENTIAL@URL,URL,…#sha256:HEX`: the node's secret, then the gRPC URLs of its
//! cells in the order it dials them, its home cell first, then the pin of the deployment's node
//! authority, which is all an agent trusts when it first meets an `https://` cell (`crate::tls`).
//! The cells and the pin may each be absent. A credential alone (no `@`) is an enrolment with no
//! cell, as on a single machine, where the agent is told where to dial. One token means one thing
//! to copy onto a vehicle, and a script that passes what `nodes add` printed as the credential
//! keeps working whichever the shape.

use std::fmt;

use crate::connection::endpoint;
use crate::AgentError;

/// Separates the credential from the cells.
const CELLS_SEPARATOR: char = '@';

/// Separates one cell's URL from the next.
const CELL_SEPARATOR: char = ',';

/// Comes before the authority's pin.
const PIN_SEPARATOR: char = '#';

/// A node's secret and the cells it dials, home first.
#[derive(Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// The node's secret, as issued by `fleetgrid nodes add`; never logged.
    pub credential: String,
    /// The cells' gRPC URLs, its home cell first; empty when enrolment named none.
    pub cells: Vec<String>,
    /// The SHA-256 pin of the node authority (`sha256:HEX`), when the deployment has one.
    pub authority_pin: Option<String>,
}

impl Enrolment {
    /// Reads a token or a bare credential; every cell URL must be one the agent can dial.
    pub fn parse(token: &str) -> Result<Enrolment, AgentError> {
        let token = token.trim();
        let (token, authority_pin) = match token.rsplit_once(PIN_SEPARATOR) {
            Some((rest, pin)) => {
                if !pin.starts_with("sha256:") {
                    return Err(AgentError::Tls(format!(
                        "the enrolment token's authority pin must be sha256:HEX, not {pin:?}"
                    )));
                }
                (rest, Some(pin.to_owned()))
            }
            None => (token, None),
        };
        let Some((credential, cells)) = token.split_once(CELLS_SEPARATOR) else {
            return Ok(Enrolment {
                credential: token.to_owned(),
                cells: Vec::new(),
                authority_pin,
            });
        };
        let cells: Vec<String> = cells
            .split(CELL_SEPARATOR)
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        for url in &cells {
            endpoint(url)?;
        }
        if cells.is_empty() {
            return Err(AgentError::NoCells);
        }
        Ok(Enrolment {
            credential: credential.to_owned(),
            cells,
            authority_pin,
        })
    }

    /// The token: the credential alone when there is no cell.
    pub fn token(&self) -> String {
        let mut token = self.credential.clone();
        if !self.cells.is_empty() {
            token.push(CELLS_SEPARATOR);
            token += &self.cells.join(&CELL_SEPARATOR.to_string());
        }
        if let Some(pin) = &self.authority_pin {
            token.push(PIN_SEPARATOR);
            token += pin;
        }
        token
    }
}

impl fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The credential is a secret; it must not end up in logs through a `{:?}`.
        f.debug_struct("Enrolment")
            .field("credential", &"<redacted>")
            .field("cells", &self.cells)
            .field("authority_pin", &self.authority_pin)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_carries_the_credential_and_the_cells_in_order() {
        let enrolment = Enrolment {
            credential: "fgn-00ff".to_owned(),
            cells: vec![
                "http://10.0.0.2:7070".to_owned(),
                "http://10.0.0.1:7070".to_owned(),
            ],
            authority_pin: None,
        };
        let token = enrolment.token();
        assert_eq!(token, "fgn-00ff@http://10.0.0.2:7070,http://10.0.0.1:7070");
        assert_eq!(Enrolment::parse(&token).unwrap(), enrolment);
        assert_eq!(Enrolment::parse(&format!(" {token}\n")).unwrap(), enrolment);
    }

    #[test]
    fn a_bare_credential_is_an_enrolment_without_cells() {
        let enrolment = Enrolment::parse("fgn-00ff").unwrap();
        assert_eq!(enrolment.credential, "fgn-00ff");
        assert!(enrolment.cells.is_empty());
        assert_eq!(enrolment.token(), "fgn-00ff");
    }

    #[test]
    fn a_token_carries_the_authority_pin_after_the_cells() {
        let token = "fgn-00ff@https://10.0.0.2:7070,https://10.0.0.1:7070#sha256:ab12";
        let enrolment = Enrolment::parse(token).unwrap();
        assert_eq!(enrolment.credential, "fgn-00ff");
        assert_eq!(enrolment.cells.len(), 2);
        assert_eq!(enrolment.authority_pin.as_deref(), Some("sha256:ab12"));
        assert_eq!(enrolment.token(), token);
        let bare = Enrolment::parse("fgn-00ff#sha256:ab12").unwrap();
        assert!(bare.cells.is_empty());
        assert_eq!(bare.authority_pin.as_deref(), Some("sha256:ab12"));
        assert!(matches!(
            Enrolment::parse("fgn-00ff#md5:ab12"),
            Err(AgentError::Tls(_))
        ));
    }

    #[test]
    fn a_token_with_a_cell_the_agent_cannot_dial_is_refused() {
        assert!(matches!(
            Enrolment::parse("fgn-00ff@ftp://cell:7070"),
            Err(AgentError::InvalidCoordinatorUrl { .. })
        ));
        assert!(matches!(
            Enrolment::parse("fgn-00ff@"),
            Err(AgentError::NoCells)
        ));
    }

    #[test]
    fn the_credential_stays_out_of_debug_output() {
        let enrolment = Enrolment::parse("fgn-secret@http://cell:7070").unwrap();
        assert!(!format!("{enrolment:?}").contains("secret"));
    }
}
