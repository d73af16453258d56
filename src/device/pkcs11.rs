//! Device keys and certificates in a PKCS#11 module (an HSM, a smart card, a TPM through
//! tpm2-pkcs11, SoftHSM), named by RFC 7512 `pkcs11:` URIs. The key never leaves the
//! module: TLS signs through it ([`TokenKey`], a rustls `SigningKey`).
//!
//! Signing hashes in this process and asks the module for the bare operation (`CKM_ECDSA`,
//! `CKM_RSA_PKCS_PSS` on a digest, `CKM_RSA_PKCS` on a DigestInfo): those are what every
//! module offers, where the hash-and-sign mechanisms are missing or broken on some (SoftHSM
//! 2.6 has no `CKM_ECDSA_SHA256`, and its multi-part `CKM_SHA256_RSA_PKCS` fails).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::types::AuthPin;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::Digest;
use zeroize::Zeroizing;

/// Where the device's PIN is read from when neither the URI nor `--pkcs11-pin-file` says.
pub const PIN_ENV: &str = "TOKEN_BROKER_PKCS11_PIN";

/// Why a key or certificate in a PKCS#11 module cannot be used. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    #[error("{uri}: not a PKCS#11 URI (RFC 7512): {reason}")]
    BadUri { uri: String, reason: String },
    #[error("the PKCS#11 URI carries pin-value: a PIN on the command line or in the environment of every process is readable by others (ps, /proc); remove pin-value and give the PIN with --pkcs11-pin-file FILE, pin-source=file:FILE in the URI, or the {PIN_ENV} environment variable")]
    PinInUri,
    #[error("PKCS#11 module {}: cannot load it ({reason}); give the module's path with --pkcs11-module or module-path= in the URI (e.g. /usr/lib/softhsm/libsofthsm2.so)", path.display())]
    ModuleMissing { path: PathBuf, reason: String },
    #[error("no PKCS#11 module given (--pkcs11-module or module-path= in the URI) and p11-kit's proxy module was not found; install the Debian package p11-kit-modules, or name the module")]
    NoModule,
    #[error("PKCS#11 token absent: no token matching {wanted} is present in {module} (present: {present})")]
    TokenAbsent {
        wanted: String,
        module: String,
        present: String,
    },
    #[error("PKCS#11 URI matches {count} tokens ({present}); add token= or serial= to choose one")]
    TokenAmbiguous { count: usize, present: String },
    #[error("wrong PIN for PKCS#11 token '{token}' (the token refused it; repeated wrong PINs lock the token, so it is not tried again until {pin_from} changes)")]
    WrongPin { token: String, pin_from: String },
    #[error("the configured PIN ({pin_from}) was refused by PKCS#11 token '{token}' and is not tried again until it changes (each wrong try brings the token closer to locking); write the right PIN there")]
    PinRefusedBefore { token: String, pin_from: String },
    #[error("the PIN of PKCS#11 token '{token}' is locked after too many wrong PINs; unlock it with the token's SO PIN")]
    PinLocked { token: String },
    #[error("PKCS#11 token '{token}' needs a PIN: give it with --pkcs11-pin-file FILE, pin-source=file:FILE in the URI, or the {PIN_ENV} environment variable")]
    PinNeeded { token: String },
    #[error("cannot read the PIN file {}: {reason}", path.display())]
    PinFile { path: PathBuf, reason: String },
    #[error("PKCS#11 {what} not found: no object matching {wanted} on token '{token}' (there: {present})")]
    NotFound {
        what: &'static str,
        wanted: String,
        token: String,
        present: String,
    },
    #[error("PKCS#11 URI matches {count} {what}s on token '{token}' ({present}); add id= or object= to choose one")]
    Ambiguous {
        what: &'static str,
        count: usize,
        token: String,
        present: String,
    },
    #[error("unsupported key type in PKCS#11 token '{token}': {what}; TLS client keys must be ECDSA P-256 or P-384, or RSA of at least 2048 bits")]
    UnsupportedKey { token: String, what: String },
    #[error("PKCS#11 token '{token}' offers no mechanism to sign with its {key} key ({needed})")]
    NoMechanism {
        token: String,
        key: &'static str,
        needed: &'static str,
    },
    #[error("{flag} names a PKCS#11 object of type={given}; it needs type={wanted} (or no type)")]
    WrongType {
        flag: &'static str,
        given: String,
        wanted: &'static str,
    },
    #[error("PKCS#11 {doing}: {error}")]
    Module { doing: String, error: String },
}

/// What an RFC 7512 URI names: attributes to match, and where the module and PIN are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// The URI without its query (which may name the PIN's file) and its `pin-*`
    /// attributes, for messages.
    shown: String,
    token: Option<String>,
    manufacturer: Option<String>,
    serial: Option<String>,
    model: Option<String>,
    slot_id: Option<u64>,
    slot_description: Option<String>,
    slot_manufacturer: Option<String>,
    library_manufacturer: Option<String>,
    library_description: Option<String>,
    object: Option<String>,
    object_type: Option<String>,
    id: Option<Vec<u8>>,
    pin_source: Option<PathBuf>,
    module_path: Option<PathBuf>,
}

impl Pkcs11Uri {
    /// Whether a `--key`/`--cert` value is a URI rather than a file name.
    pub fn is_uri(text: &str) -> bool {
        text.get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("pkcs11:"))
    }

    /// Whether `text` (a URI, or anything given where one may be) carries a `pin-value`
    /// attribute, in any case, anywhere.
    pub fn has_pin_value(text: &str) -> bool {
        decoded_lowercase(text).contains("pin-value")
    }

    /// `text` as it may be shown: without its query (which may name the PIN's file) and
    /// without any `pin-*` attribute (a PIN or its source given by mistake).
    pub fn redacted(text: &str) -> String {
        let path = text.split(['?', '#']).next().unwrap_or_default();
        let (scheme, attributes) = match path.split_once(':') {
            Some((scheme, attributes)) => (format!("{scheme}:"), attributes),
            None => (String::new(), path),
        };
        let kept: Vec<&str> = attributes
            .split(';')
            .filter(|a| !decoded_lowercase(a.trim_start()).starts_with("pin-"))
            .collect();
        format!("{scheme}{}", kept.join(";"))
    }

    /// Parses `pkcs11:path-attrs?query-attrs`. Attributes it does not know are refused
    /// rather than ignored: ignoring one would pick an object the operator did not mean.
    /// `pin-value` is refused before anything else is looked at (PIN only from a file or
    /// [`PIN_ENV`]); no error repeats a query or a `pin-*` attribute ([`Pkcs11Uri::redacted`]).
    pub fn parse(text: &str) -> Result<Pkcs11Uri, Pkcs11Error> {
        if Pkcs11Uri::has_pin_value(text) {
            return Err(Pkcs11Error::PinInUri);
        }
        let shown = || Pkcs11Uri::redacted(text);
        let bad = |reason: String| Pkcs11Error::BadUri {
            uri: shown(),
            reason,
        };
        if !Pkcs11Uri::is_uri(text) {
            return Err(bad("it does not start with pkcs11:".into()));
        }
        let rest = &text[7..];
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Pkcs11Uri {
            shown: shown(),
            ..Pkcs11Uri::default()
        };
        let query_attributes = query.split('&').filter(|a| !a.is_empty());
        for (attribute, in_query) in path
            .split(';')
            .filter(|a| !a.is_empty())
            .map(|a| (a, false))
            .chain(query_attributes.map(|a| (a, true)))
        {
            let (name, value) = attribute.split_once('=').ok_or_else(|| {
                bad(if attribute.to_ascii_lowercase().starts_with("pin-") {
                    "a pin-* attribute has no '='".into()
                } else {
                    format!("attribute {attribute:?} has no '='")
                })
            })?;
            let bytes: Vec<u8> = percent_encoding::percent_decode_str(value).collect();
            let text_value = || {
                String::from_utf8(bytes.clone())
                    .map_err(|_| bad(format!("{name} is not UTF-8 once percent-decoded")))
            };
            let set = |slot: &mut Option<String>| -> Result<(), Pkcs11Error> {
                if slot.is_some() {
                    return Err(bad(format!("{name} given twice")));
                }
                *slot = Some(text_value()?);
                Ok(())
            };
            match (name, in_query) {
                ("token", false) => set(&mut uri.token)?,
                ("manufacturer", false) => set(&mut uri.manufacturer)?,
                ("serial", false) => set(&mut uri.serial)?,
                ("model", false) => set(&mut uri.model)?,
                ("slot-description", false) => set(&mut uri.slot_description)?,
                ("slot-manufacturer", false) => set(&mut uri.slot_manufacturer)?,
                ("library-manufacturer", false) => set(&mut uri.library_manufacturer)?,
                ("library-description", false) => set(&mut uri.library_description)?,
                ("object", false) => set(&mut uri.object)?,
                ("type", false) => {
                    set(&mut uri.object_type)?;
                    if !matches!(
                        uri.object_type.as_deref(),
                        Some("private" | "cert" | "public" | "secret-key" | "data")
                    ) {
                        return Err(bad(
                            "type must be private, cert, public, secret-key or data".into(),
                        ));
                    }
                }
                ("slot-id", false) => {
                    uri.slot_id = Some(
                        text_value()?
                            .parse()
                            .map_err(|_| bad("slot-id is not a decimal number".into()))?,
                    )
                }
                ("id", false) => uri.id = Some(bytes),
                ("pin-source", true) => {
                    let source = text_value()?;
                    let path = source
                        .strip_prefix("file://")
                        .or_else(|| source.strip_prefix("file:"))
                        .unwrap_or(&source);
                    if !path.starts_with('/') {
                        return Err(bad(
                            "pin-source must be file:/absolute/path (a file holding the PIN)"
                                .into(),
                        ));
                    }
                    uri.pin_source = Some(PathBuf::from(path));
                }
                ("module-path", true) => uri.module_path = Some(PathBuf::from(text_value()?)),
                ("module-name", true) => {
                    return Err(bad(
                        "module-name is not supported: use module-path= or --pkcs11-module".into(),
                    ))
                }
                _ => {
                    return Err(bad(format!(
                        "unknown {} attribute {name:?}",
                        if in_query { "query" } else { "path" }
                    )))
                }
            }
        }
        Ok(uri)
    }

    /// The URI as given, without its query.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn module_path(&self) -> Option<&Path> {
        self.module_path.as_deref()
    }

    pub fn pin_source(&self) -> Option<&Path> {
        self.pin_source.as_deref()
    }

    fn object_wanted(&self) -> String {
        let mut parts = Vec::new();
        if let Some(label) = &self.object {
            parts.push(format!("object={label}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id={}", hex(id)));
        }
        if parts.is_empty() {
            "any".into()
        } else {
            parts.join(";")
        }
    }

    fn token_wanted(&self) -> String {
        let fields = [
            ("token", &self.token),
            ("manufacturer", &self.manufacturer),
            ("serial", &self.serial),
            ("model", &self.model),
            ("slot-description", &self.slot_description),
            ("slot-manufacturer", &self.slot_manufacturer),
        ];
        let mut parts: Vec<String> = fields
            .iter()
            .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={v}")))
            .collect();
        if let Some(id) = self.slot_id {
            parts.push(format!("slot-id={id}"));
        }
        if parts.is_empty() {
            "any token".into()
        } else {
            parts.join(";")
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02x}")).collect()
}

fn module_error(doing: impl Into<String>) -> impl FnOnce(CkError) -> Pkcs11Error {
    let doing = doing.into();
    move |error| Pkcs11Error::Module {
        doing,
        error: match error {
            CkError::Pkcs11(rv, function) => format!("{function} failed with {rv:?}"),
            other => other.to_string(),
        },
    }
}

/// Where p11-kit's proxy module (every module registered with p11-kit) lives on Debian and
/// other distributions.
const P11_KIT_PROXY: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib/arm-linux-gnueabihf/p11-kit-proxy.so",
    "/usr/lib64/p11-kit-proxy.so",
    "/usr/lib/p11-kit-proxy.so",
];

/// A loaded and initialized module (one per process: modules refuse a second
/// initialization). Every call into it takes `state` shared; [`Module::reinitialize`] takes
/// it alone, so no call runs while the module starts again.
#[derive(Clone)]
pub struct Module(Arc<ModuleInner>);

struct ModuleInner {
    context: Pkcs11,
    path: PathBuf,
    /// How many times the module was initialized again: a session opened before is gone
    /// with the previous initialization, and is never used or closed (its handle may now
    /// name another session).
    state: RwLock<u64>,
}

fn poisoned<T>(_: T) -> Pkcs11Error {
    Pkcs11Error::Module {
        doing: "using the module".into(),
        error: "an earlier use panicked".into(),
    }
}

impl Module {
    /// Loads `path`, or p11-kit's proxy module when `None`.
    pub fn load(path: Option<&Path>) -> Result<Module, Pkcs11Error> {
        let path = match path {
            Some(path) => path.to_owned(),
            None => P11_KIT_PROXY
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .ok_or(Pkcs11Error::NoModule)?,
        };
        let missing = |reason: String| Pkcs11Error::ModuleMissing {
            path: path.clone(),
            reason,
        };
        if !path.is_file() {
            return Err(missing("no such file".into()));
        }
        let context = Pkcs11::new(&path).map_err(|e| missing(e.to_string()))?;
        initialize(&context, &path)?;
        Ok(Module(Arc::new(ModuleInner {
            context,
            path,
            state: RwLock::new(0),
        })))
    }

    /// Finalizes and initializes the module again (`C_Finalize`, `C_Initialize`): the only
    /// way a module shows a token re-created or reinserted since it was initialized
    /// (SoftHSM2 keeps listing the old one, whose every use then fails). Every session
    /// opened before is invalid from then on.
    pub fn reinitialize(&self) -> Result<(), Pkcs11Error> {
        let mut generation = self.0.state.write().map_err(poisoned)?;
        *generation += 1;
        // Not initialized (an earlier attempt failed half-way) is as good as finalized.
        let _ = self.0.context.clone().finalize();
        initialize(&self.0.context, &self.0.path)
    }

    /// The one token `uri` names, with a session that is not logged in (see
    /// [`Token::login`]).
    pub fn open(&self, uri: &Pkcs11Uri) -> Result<Token, Pkcs11Error> {
        off_the_runtime(|| {
            let state = self.0.state.read().map_err(poisoned)?;
            self.open_at(uri, *state)
        })
    }

    fn open_at(&self, uri: &Pkcs11Uri, generation: u64) -> Result<Token, Pkcs11Error> {
        let context = &self.0.context;
        let module = self.0.path.display().to_string();
        if uri.library_manufacturer.is_some() || uri.library_description.is_some() {
            let info = context
                .get_library_info()
                .map_err(module_error("reading the module's information"))?;
            let differs = |wanted: &Option<String>, actual: &str| {
                wanted.as_deref().is_some_and(|w| w != actual.trim_end())
            };
            if differs(&uri.library_manufacturer, info.manufacturer_id())
                || differs(&uri.library_description, info.library_description())
            {
                return Err(Pkcs11Error::TokenAbsent {
                    wanted: "the URI's library-manufacturer/library-description".into(),
                    module,
                    present: format!(
                        "library-manufacturer={};library-description={}",
                        info.manufacturer_id().trim_end(),
                        info.library_description().trim_end()
                    ),
                });
            }
        }
        // Every slot with a token, each asked on its own: one whose token is gone (deleted
        // under a running process) fails alone, not the listing.
        let slots = context
            .get_slots_with_token()
            .map_err(module_error("listing the module's tokens"))?;
        let mut present = Vec::new();
        let mut matching = Vec::new();
        for slot in slots {
            let Ok(token) = context.get_token_info(slot) else {
                continue;
            };
            if !token.token_initialized() {
                continue;
            }
            let slot_info = context
                .get_slot_info(slot)
                .map_err(module_error("reading a slot's information"))?;
            let label = token.label().trim_end().to_owned();
            let same = |wanted: &Option<String>, actual: &str| {
                wanted.as_deref().is_none_or(|w| w == actual.trim_end())
            };
            let matches = same(&uri.token, &label)
                && same(&uri.manufacturer, token.manufacturer_id())
                && same(&uri.serial, token.serial_number())
                && same(&uri.model, token.model())
                && same(&uri.slot_description, slot_info.slot_description())
                && same(&uri.slot_manufacturer, slot_info.manufacturer_id())
                && uri.slot_id.is_none_or(|id| id == slot.id());
            present.push(format!("'{label}'"));
            if matches {
                matching.push((slot, label, token.login_required()));
            }
        }
        let present = if present.is_empty() {
            "no token".to_owned()
        } else {
            present.join(", ")
        };
        let (slot, label, login_required) = match matching.len() {
            1 => matching.remove(0),
            0 => {
                return Err(Pkcs11Error::TokenAbsent {
                    wanted: uri.token_wanted(),
                    module,
                    present,
                })
            }
            count => return Err(Pkcs11Error::TokenAmbiguous { count, present }),
        };
        // Closed by `Held` while this initialization lasts, never after.
        let session = context
            .open_ro_session_no_drop(slot)
            .map_err(module_error(format!(
                "opening a session with token '{label}'"
            )))?;
        // Asked one by one: listing them all makes cryptoki log every mechanism it does not
        // know as an error.
        let mechanisms = [
            MechanismType::ECDSA,
            MechanismType::RSA_PKCS_PSS,
            MechanismType::RSA_PKCS,
        ]
        .into_iter()
        .filter(|mechanism| {
            context
                .get_mechanism_info(slot, *mechanism)
                .is_ok_and(|info| info.sign())
        })
        .collect();
        Ok(Token {
            held: Arc::new(Held {
                module: self.clone(),
                generation,
                session: Mutex::new(Some(session)),
                failure: Mutex::new(None),
            }),
            label,
            login_required,
            mechanisms,
        })
    }
}

fn initialize(context: &Pkcs11, path: &Path) -> Result<(), Pkcs11Error> {
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(module_error(format!("initializing {}", path.display()))(e)),
    }
}

/// A device PIN, wiped when dropped.
pub struct Pin(AuthPin);

impl Pin {
    /// The first line of `path` (a file only its owner may read, like a key file).
    pub fn from_file(path: &Path) -> Result<Pin, Pkcs11Error> {
        let unreadable = |reason: String| Pkcs11Error::PinFile {
            path: path.to_owned(),
            reason,
        };
        let bytes = crate::pem::read_secret(path).map_err(|e| unreadable(e.to_string()))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| unreadable("not UTF-8".into()))?;
        let pin = text.lines().next().unwrap_or_default();
        if pin.is_empty() {
            return Err(unreadable("it is empty".into()));
        }
        Ok(Pin(AuthPin::from(pin)))
    }

    pub fn from_text(text: Zeroizing<String>) -> Pin {
        Pin(AuthPin::from(text.as_str()))
    }
}

/// A session of one module initialization, closed when the last `Token` using it goes
/// while that initialization lasts.
struct Held {
    module: Module,
    generation: u64,
    session: Mutex<Option<Session>>,
    /// The first failure of the module seen through this session: from then on the
    /// session is not used again, and the token is opened anew.
    failure: Mutex<Option<String>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Ok(state) = self.module.0.state.read() else {
            return;
        };
        if *state != self.generation {
            return;
        }
        if let Some(session) = self.session.lock().ok().and_then(|mut s| s.take()) {
            let _ = session.close();
        }
    }
}

/// A token with its session. Sessions are not safe to share between threads, so every use
/// takes the lock.
#[derive(Clone)]
pub struct Token {
    held: Arc<Held>,
    label: String,
    login_required: bool,
    mechanisms: Vec<MechanismType>,
}

impl Token {
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `work` with the session, off the runtime's workers, unless the session failed
    /// before or belongs to an earlier initialization of the module. A failure of the
    /// module's own (not a missing object) marks the session failed.
    fn with_session<T>(
        &self,
        work: impl FnOnce(&Session) -> Result<T, Pkcs11Error>,
    ) -> Result<T, Pkcs11Error> {
        off_the_runtime(|| {
            if let Some(failure) = self.failure() {
                return Err(Pkcs11Error::Module {
                    doing: format!("using token '{}'", self.label),
                    error: format!("{failure} (earlier)"),
                });
            }
            let state = self.held.module.0.state.read().map_err(poisoned)?;
            if *state != self.held.generation {
                return Err(self.failed(Pkcs11Error::Module {
                    doing: format!("using token '{}'", self.label),
                    error: "the module was initialized again since this session was opened".into(),
                }));
            }
            let session = self.held.session.lock().map_err(poisoned)?;
            let session = session.as_ref().ok_or_else(|| Pkcs11Error::Module {
                doing: format!("using token '{}'", self.label),
                error: "the session is closed".into(),
            })?;
            work(session).map_err(|error| match error {
                Pkcs11Error::Module { .. } => self.failed(error),
                other => other,
            })
        })
    }

    fn failed(&self, error: Pkcs11Error) -> Pkcs11Error {
        if let Ok(mut failure) = self.held.failure.lock() {
            failure.get_or_insert_with(|| error.to_string());
        }
        error
    }

    /// The module's failure seen through this session, if any (see [`Token::usable`]).
    pub fn failure(&self) -> Option<String> {
        self.held.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Whether this token needs a login that its session does not have (yet).
    pub fn needs_login(&self) -> Result<bool, Pkcs11Error> {
        if !self.login_required {
            return Ok(false);
        }
        let label = self.label.clone();
        self.with_session(|session| {
            let info = session.get_session_info().map_err(module_error(format!(
                "reading the session with token '{label}'"
            )))?;
            Ok(matches!(
                info.session_state(),
                SessionState::RoPublic | SessionState::RwPublic
            ))
        })
    }

    /// Logs in as the user with `pin` (`C_Login`): once, the caller decides whether to try.
    pub fn login(&self, pin: &Pin, pin_from: &str) -> Result<(), Pkcs11Error> {
        let label = self.label.clone();
        self.with_session(
            |session| match session.login(UserType::User, Some(&pin.0)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
                Err(CkError::Pkcs11(
                    RvError::PinIncorrect
                    | RvError::PinInvalid
                    | RvError::PinLenRange
                    | RvError::PinExpired,
                    _,
                )) => Err(Pkcs11Error::WrongPin {
                    token: label,
                    pin_from: pin_from.to_owned(),
                }),
                Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                    Err(Pkcs11Error::PinLocked { token: label })
                }
                // The token or session went away: not about the PIN, healed by reopening.
                Err(
                    e @ CkError::Pkcs11(
                        RvError::TokenNotPresent
                        | RvError::DeviceRemoved
                        | RvError::SessionHandleInvalid
                        | RvError::SessionClosed
                        | RvError::CryptokiNotInitialized,
                        _,
                    ),
                ) => Err(module_error(format!("logging in to token '{label}'"))(e)),
                // Anything else (a module that says GENERAL_ERROR or DEVICE_ERROR for a wrong
                // PIN): counted as a refusal of this PIN, so that it is not tried again.
                Err(_) => Err(Pkcs11Error::WrongPin {
                    token: label,
                    pin_from: pin_from.to_owned(),
                }),
            },
        )
    }

    /// Whether the session still works: no failure seen through it, and the module says it
    /// is open and logged in when the token needs it (reinserted tokens come back logged
    /// out). It waits for the session while a signature holds it: off the runtime, as
    /// signing is.
    pub fn usable(&self) -> bool {
        let login_required = self.login_required;
        self.with_session(|session| {
            let info = session
                .get_session_info()
                .map_err(module_error("reading the session's state"))?;
            Ok(match info.session_state() {
                SessionState::RoUser | SessionState::RwUser => true,
                // Logged out (the token was reinserted): usable only if no login is needed.
                SessionState::RoPublic | SessionState::RwPublic => !login_required,
                _ => false,
            })
        })
        .unwrap_or(false)
    }

    /// The one object of `class` that `uri` names.
    fn find(
        &self,
        session: &Session,
        uri: &Pkcs11Uri,
        class: ObjectClass,
        what: &'static str,
    ) -> Result<ObjectHandle, Pkcs11Error> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(label) = &uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let mut found = session
            .find_objects(&template)
            .map_err(module_error(format!("searching token '{}'", self.label)))?;
        if found.len() == 1 {
            return Ok(found.remove(0));
        }
        // Name what is there, so the operator can correct the URI.
        let all = session
            .find_objects(&[Attribute::Class(class)])
            .unwrap_or_default();
        let names: Vec<String> = all
            .iter()
            .map(|handle| {
                let attributes = session
                    .get_attributes(*handle, &[AttributeType::Label, AttributeType::Id])
                    .unwrap_or_default();
                let mut name = String::new();
                for attribute in attributes {
                    match attribute {
                        Attribute::Label(label) => {
                            name = format!("object={}{name}", String::from_utf8_lossy(&label))
                        }
                        Attribute::Id(id) => name.push_str(&format!(";id={}", hex(&id))),
                        _ => {}
                    }
                }
                name
            })
            .collect();
        let present = if names.is_empty() {
            format!("no {what}")
        } else {
            names.join(", ")
        };
        Err(if found.is_empty() {
            Pkcs11Error::NotFound {
                what,
                wanted: uri.object_wanted(),
                token: self.label.clone(),
                present,
            }
        } else {
            Pkcs11Error::Ambiguous {
                what,
                count: found.len(),
                token: self.label.clone(),
                present,
            }
        })
    }

    /// The DER certificate `uri` names (`type=cert`, or no type).
    pub fn certificate(&self, uri: &Pkcs11Uri) -> Result<Vec<u8>, Pkcs11Error> {
        check_type(uri, "cert", "--cert")?;
        let attributes = self.with_session(|session| {
            let handle = self.find(session, uri, ObjectClass::CERTIFICATE, "certificate")?;
            session
                .get_attributes(handle, &[AttributeType::Value])
                .map_err(module_error(format!(
                    "reading a certificate of '{}'",
                    self.label
                )))
        })?;
        attributes
            .into_iter()
            .find_map(|attribute| match attribute {
                Attribute::Value(der) => Some(der),
                _ => None,
            })
            .ok_or_else(|| Pkcs11Error::Module {
                doing: format!("reading a certificate of '{}'", self.label),
                error: "the object has no CKA_VALUE".into(),
            })
    }

    /// The private key `uri` names (`type=private`, or no type), as a TLS signing key.
    pub fn private_key(&self, uri: &Pkcs11Uri) -> Result<TokenKey, Pkcs11Error> {
        check_type(uri, "private", "--key")?;
        let (handle, attributes) = self.with_session(|session| {
            let handle = self.find(session, uri, ObjectClass::PRIVATE_KEY, "private key")?;
            let attributes = session
                .get_attributes(
                    handle,
                    &[
                        AttributeType::KeyType,
                        AttributeType::EcParams,
                        AttributeType::Modulus,
                        AttributeType::AlwaysAuthenticate,
                    ],
                )
                .map_err(module_error(format!("reading a key of '{}'", self.label)))?;
            Ok((handle, attributes))
        })?;
        let unsupported = |what: String| Pkcs11Error::UnsupportedKey {
            token: self.label.clone(),
            what,
        };
        let mut key_type = None;
        let mut ec_params = None;
        let mut modulus = None;
        for attribute in attributes {
            match attribute {
                Attribute::AlwaysAuthenticate(true) => return Err(unsupported(
                    "a key that needs the PIN again for every signature (CKA_ALWAYS_AUTHENTICATE)"
                        .into(),
                )),
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(p) => ec_params = Some(p),
                Attribute::Modulus(m) => modulus = Some(m),
                _ => {}
            }
        }
        let has = |mechanism: MechanismType| self.mechanisms.contains(&mechanism);
        let kind = match key_type {
            Some(KeyType::EC) => {
                let curve = match ec_params.as_deref() {
                    Some(P256_OID) => Curve::P256,
                    Some(P384_OID) => Curve::P384,
                    _ => {
                        return Err(unsupported(
                            "an elliptic curve other than P-256 and P-384".into(),
                        ))
                    }
                };
                if !has(MechanismType::ECDSA) {
                    return Err(Pkcs11Error::NoMechanism {
                        token: self.label.clone(),
                        key: "EC",
                        needed: "CKM_ECDSA",
                    });
                }
                KeyKind::Ec(curve)
            }
            Some(KeyType::RSA) => {
                let bytes = modulus.unwrap_or_default();
                let bits = bytes.iter().skip_while(|b| **b == 0).count() * 8;
                if bits < 2048 {
                    return Err(unsupported(format!("RSA-{bits}")));
                }
                let (pss, pkcs1) = (
                    has(MechanismType::RSA_PKCS_PSS),
                    has(MechanismType::RSA_PKCS),
                );
                if !pss && !pkcs1 {
                    return Err(Pkcs11Error::NoMechanism {
                        token: self.label.clone(),
                        key: "RSA",
                        needed: "CKM_RSA_PKCS_PSS or CKM_RSA_PKCS",
                    });
                }
                KeyKind::Rsa { pss, pkcs1 }
            }
            Some(other) => return Err(unsupported(format!("{other}"))),
            None => {
                return Err(unsupported(
                    "the module does not say (no CKA_KEY_TYPE)".into(),
                ))
            }
        };
        Ok(TokenKey(Arc::new(KeyInToken {
            token: self.clone(),
            handle,
            kind,
        })))
    }
}

fn check_type(
    uri: &Pkcs11Uri,
    wanted: &'static str,
    flag: &'static str,
) -> Result<(), Pkcs11Error> {
    match uri.object_type.as_deref() {
        None => Ok(()),
        Some(t) if t == wanted => Ok(()),
        Some(other) => Err(Pkcs11Error::WrongType {
            flag,
            given: other.to_owned(),
            wanted,
        }),
    }
}

/// DER OIDs of the named curves (CKA_EC_PARAMS).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Ec(Curve),
    /// Which paddings the module can do.
    Rsa {
        pss: bool,
        pkcs1: bool,
    },
}

struct KeyInToken {
    token: Token,
    handle: ObjectHandle,
    kind: KeyKind,
}

/// A private key that stays in its module; rustls signs the handshake through it.
#[derive(Clone)]
pub struct TokenKey(Arc<KeyInToken>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey({:?} in '{}')", self.0.kind, self.0.token.label)
    }
}

impl TokenKey {
    /// Whether the key can still sign: its token's session works, and the key object is
    /// still there (a re-created token has the same objects under other handles; a pooled
    /// connection or a resumed TLS session would hide that until the next full handshake).
    pub fn usable(&self) -> bool {
        let key = &self.0;
        key.token.usable()
            && key
                .token
                .with_session(|session| {
                    session
                        .get_attributes(key.handle, &[AttributeType::Class])
                        .map_err(module_error(format!(
                            "reading the key in token '{}'",
                            key.token.label
                        )))
                })
                .is_ok()
    }

    /// The module's failure seen while signing (or otherwise using the key's session), if
    /// any: the reason a handshake failed, and that the token must be opened again.
    pub fn failure(&self) -> Option<String> {
        self.0.token.failure()
    }

    /// The TLS schemes this key can sign, preferred first (PSS before PKCS#1: TLS 1.3
    /// allows only PSS for RSA).
    fn schemes(&self) -> Vec<SignatureScheme> {
        use SignatureScheme as S;
        match self.0.kind {
            KeyKind::Ec(Curve::P256) => vec![S::ECDSA_NISTP256_SHA256],
            KeyKind::Ec(Curve::P384) => vec![S::ECDSA_NISTP384_SHA384],
            KeyKind::Rsa { pss, pkcs1 } => {
                let mut schemes = Vec::new();
                if pss {
                    schemes.extend([S::RSA_PSS_SHA256, S::RSA_PSS_SHA384, S::RSA_PSS_SHA512]);
                }
                if pkcs1 {
                    schemes.extend([
                        S::RSA_PKCS1_SHA256,
                        S::RSA_PKCS1_SHA384,
                        S::RSA_PKCS1_SHA512,
                    ]);
                }
                schemes
            }
        }
    }
}

impl SigningKey for TokenKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self
            .schemes()
            .into_iter()
            .find(|scheme| offered.contains(scheme))?;
        Some(Box::new(TokenSigner {
            key: self.0.clone(),
            scheme,
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.0.kind {
            KeyKind::Ec(_) => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa { .. } => SignatureAlgorithm::RSA,
        }
    }
}

struct TokenSigner {
    key: Arc<KeyInToken>,
    scheme: SignatureScheme,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSigner({:?})", self.scheme)
    }
}

/// DER DigestInfo prefixes (RFC 8017 9.2, note 1) for CKM_RSA_PKCS, which signs what it is
/// given.
const SHA256_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
const SHA384_INFO: &[u8] = &[
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];
const SHA512_INFO: &[u8] = &[
    0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05,
    0x00, 0x04, 0x40,
];

impl Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        use SignatureScheme as S;
        let (hash, mgf, info): (MechanismType, PkcsMgfType, &[u8]) = match self.scheme {
            S::ECDSA_NISTP256_SHA256 | S::RSA_PSS_SHA256 | S::RSA_PKCS1_SHA256 => {
                (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, SHA256_INFO)
            }
            S::ECDSA_NISTP384_SHA384 | S::RSA_PSS_SHA384 | S::RSA_PKCS1_SHA384 => {
                (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384, SHA384_INFO)
            }
            _ => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512, SHA512_INFO),
        };
        let digest = match hash {
            MechanismType::SHA256 => sha2::Sha256::digest(message).to_vec(),
            MechanismType::SHA384 => sha2::Sha384::digest(message).to_vec(),
            _ => sha2::Sha512::digest(message).to_vec(),
        };
        let (mechanism, input) = match self.scheme {
            S::ECDSA_NISTP256_SHA256 | S::ECDSA_NISTP384_SHA384 => (Mechanism::Ecdsa, digest),
            S::RSA_PSS_SHA256 | S::RSA_PSS_SHA384 | S::RSA_PSS_SHA512 => {
                let params = PkcsPssParams {
                    hash_alg: hash,
                    mgf,
                    s_len: (digest.len() as u64).into(),
                };
                (Mechanism::RsaPkcsPss(params), digest)
            }
            _ => (Mechanism::RsaPkcs, [info, &digest].concat()),
        };
        let token = &self.key.token;
        let signature = token
            .with_session(|session| {
                session
                    .sign(&mechanism, self.key.handle, &input)
                    .map_err(module_error(format!(
                        "signing with the key in token '{}'",
                        token.label
                    )))
            })
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        match self.key.kind {
            // PKCS#11 returns r || s; TLS wants the DER Ecdsa-Sig-Value.
            KeyKind::Ec(_) => crate::der::ecdsa_signature(&signature).ok_or_else(|| {
                // A module failure like any other: the session is not used again.
                let failure = token.failed(Pkcs11Error::Module {
                    doing: format!("signing with the key in token '{}'", token.label),
                    error: "the module returned a malformed ECDSA signature".into(),
                });
                rustls::Error::General(failure.to_string())
            }),
            KeyKind::Rsa { .. } => Ok(signature),
        }
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Runs `work`, which blocks: a TPM signs in tens to hundreds of milliseconds, and a
/// token's one session makes concurrent handshakes wait their turn. rustls calls the signer
/// `text` with its `%XX` escapes decoded and in lowercase: how an attribute name is
/// compared (`pin%2Dvalue` is `pin-value`).
fn decoded_lowercase(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = bytes
            .get(at + 1..at + 3)
            .filter(|_| bytes[at] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                at += 3;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

/// synchronously inside a handshake's poll, where nothing can be awaited, so on a
/// multi-threaded runtime (the agent's) the worker hands its other tasks to another thread
/// meanwhile. On a current-thread runtime (`token`, one request) or none, it just runs.
pub(crate) fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signature that waits for another task of a one-worker runtime only completes if
    /// that task can run meanwhile (without `block_in_place` it times out).
    #[test]
    fn a_blocking_signature_leaves_the_runtime_to_other_tasks() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let waited = runtime.block_on(async {
            tokio::spawn(async {
                let (done, other_ran) = std::sync::mpsc::channel();
                // Spawned from the worker: queued behind the blocking task, on its worker.
                tokio::spawn(async move { done.send(()) });
                off_the_runtime(|| other_ran.recv_timeout(std::time::Duration::from_secs(10)))
            })
            .await
        });
        assert_eq!(waited.unwrap(), Ok(()));
        // Where there is no worker to hand over (`token`'s runtime, or none), it just runs.
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(current.block_on(async { off_the_runtime(|| 7) }), 7);
        assert_eq!(off_the_runtime(|| 7), 7);
    }

    #[test]
    fn uris_parse_as_rfc_7512_says() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=My%20Token;object=device;type=private;id=%01%a2?pin-source=file:/run/pin&module-path=/usr/lib/x.so",
        )
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("My Token"));
        assert_eq!(uri.object.as_deref(), Some("device"));
        assert_eq!(uri.id.as_deref(), Some(&[0x01, 0xa2][..]));
        assert_eq!(uri.pin_source(), Some(Path::new("/run/pin")));
        assert_eq!(uri.module_path(), Some(Path::new("/usr/lib/x.so")));
        assert_eq!(
            Pkcs11Uri::parse("PKCS11:slot-id=3;model=x")
                .unwrap()
                .slot_id,
            Some(3)
        );
        assert_eq!(
            Pkcs11Uri::parse("pkcs11:?pin-source=file:///etc/pin")
                .unwrap()
                .pin_source(),
            Some(Path::new("/etc/pin"))
        );
    }

    #[test]
    fn a_pin_in_the_uri_is_refused_without_repeating_it() {
        let error = Pkcs11Uri::parse("pkcs11:token=t?pin-value=123456").unwrap_err();
        assert!(matches!(error, Pkcs11Error::PinInUri));
        assert!(!error.to_string().contains("123456"));
        let bad = Pkcs11Uri::parse("pkcs11:token=t;colour=red?pin-value=123456").unwrap_err();
        assert!(!bad.to_string().contains("123456"), "{bad}");
        let in_path = Pkcs11Uri::parse("pkcs11:token=t;pin-value=123456").unwrap_err();
        assert!(matches!(in_path, Pkcs11Error::PinInUri));
        // Refused before any other check, whatever else is wrong, in any case.
        for text in [
            "pkcs11:colour=red;pin-value=123456",
            "pkcs11:token;pin-value=123456",
            "pkcs11:token=a;token=b?pin-value=123456",
            "PKCS11:PIN-VALUE=123456",
            "pkcs12:pin-value=123456",
        ] {
            assert!(
                matches!(Pkcs11Uri::parse(text), Err(Pkcs11Error::PinInUri)),
                "{text}"
            );
        }
    }

    #[test]
    fn no_error_repeats_a_pin_attribute() {
        for text in [
            "pkcs11:colour=red;pin-source=123456",
            "pkcs11:pin-source=123456;colour=red",
            "pkcs11:token=a;pin-source123456",
            "pkcs11:colour=red?pin-source=file:123456",
            "pkcs11:token=a?pin-source=123456",
            "pkcs11:token=a;Pin-Source=123456;type=key",
            "pkcs11:token=a;pin%2Dsource=123456;type=key",
        ] {
            let error = Pkcs11Uri::parse(text).unwrap_err();
            assert!(matches!(error, Pkcs11Error::BadUri { .. }), "{text}");
            assert!(!error.to_string().contains("123456"), "{text}: {error}");
        }
        assert_eq!(
            Pkcs11Uri::redacted("pkcs11:token=a;pin-source=x;object=b?pin-source=file:/p"),
            "pkcs11:token=a;object=b"
        );
        // An escaped name is the name: pin%2dvalue is refused as pin-value is.
        assert!(matches!(
            Pkcs11Uri::parse("pkcs11:token=a;pin%2dvalue=123456"),
            Err(Pkcs11Error::PinInUri)
        ));
    }

    #[test]
    fn unknown_or_malformed_attributes_are_refused() {
        for text in [
            "pkcs11:colour=red",
            "pkcs11:token",
            "pkcs11:token=a;token=b",
            "pkcs11:type=key",
            "pkcs11:slot-id=x",
            "pkcs11:?module-name=softhsm2",
            "pkcs11:?pin-source=relative",
            "file:/key.pem",
        ] {
            assert!(
                matches!(Pkcs11Uri::parse(text), Err(Pkcs11Error::BadUri { .. })),
                "{text}"
            );
        }
    }
}
